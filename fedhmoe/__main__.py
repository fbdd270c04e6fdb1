from fedhmoe.cli import main

raise SystemExit(main())
