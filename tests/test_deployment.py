"""The same app on Flower's Deployment Engine, secured: a SuperLink with TLS and SuperNode authentication, three
registered SuperNodes and two intruders (a key never registered, no key), all on loopback, under `flwr run`; one
client that raises and one SuperNode killed mid-run. Certificates and keys are made here with `cryptography`."""

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *extensions: x509.ExtensionType) -> x509.Certificate:
    """``subject``'s certificate for ``key``, signed by ``issuer`` (self-signed when None), valid for a day, with
    the key identifiers strict X.509 checks ask for."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=not isinstance(ext, x509.SubjectAlternativeName))
    return builder.sign(issuer_key, hashes.SHA384())


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A certificate authority and the SuperLink's certificate signed by it, valid for 127.0.0.1 and localhost,
    as PEM files: ``(ca.crt, server.pem, server.key)``, what ``--ssl-ca-certfile``, ``--ssl-certfile`` and
    ``--ssl-keyfile`` take (``ca.crt`` is also the SuperNodes' ``--root-certificates`` and ``flwr``'s
    ``root-certificates``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    usage = dict.fromkeys(["content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"], False)
    ca = _certificate("fedhmoe test CA", ca_key, None, ca_key, x509.BasicConstraints(ca=True, path_length=0),
                      x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = _certificate("localhost", key, ca, ca_key, san, x509.BasicConstraints(ca=False, path_length=None),
                        x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage))
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair as Flower reads it: the private key in OpenSSH format
    (``flower-supernode --auth-supernode-private-key``) and the public key as one OpenSSH line
    (``flwr supernode register``), the files ``ssh-keygen -t ecdsa -b 384 -N ""`` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def flwr_json(env: dict, *commands: list[str]) -> list[dict]:
    """Each ``flwr <command> --format json`` (run side by side), its answer parsed; a failed command fails the test
    with its output."""
    procs = [subprocess.Popen([str(BIN / "flwr"), *command, "--format", "json"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command in commands]
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
        answers.append(json.loads(out))
    return answers


@contextlib.contextmanager
def federation(tmp_path: Path, node_configs: list[str], unregistered_config: str | None = None,
               keyless_config: str | None = None):
    """A SuperLink on loopback with TLS and SuperNode authentication, and one SuperNode per node config, each with
    its own key pair, registered with ``flwr supernode register`` before the SuperNode starts. Intruders follow, in
    this order: with ``unregistered_config``, a SuperNode whose key pair was never registered; with
    ``keyless_config``, one without a key (it tries to register itself, as on a SuperLink without authentication).
    Yields (env for ``flwr``, SuperNode processes, registered node ids in node order, the unregistered public key).
    Every process is stopped afterwards."""
    home, keys = tmp_path / "flwr-home", tmp_path / "keys"
    home.mkdir()
    ca, cert, key = make_tls_files(keys)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    link = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n')
    procs = [_start([str(BIN / "flower-superlink"), "--port", str(link), "--ssl-ca-certfile", str(ca),
                     "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
                     "--disable-runtime-dependency-installation"], tmp_path / "superlink.log", env)]
    try:
        pairs = [make_node_keys(keys, f"supernode-{i}") for i in range(len(node_configs))]
        intruder = make_node_keys(keys, "intruder") if unregistered_config is not None else None
        deadline = time.monotonic() + 60
        while True:  # the SuperLink's port answers once it serves
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", link)) == 0:
                    break
            assert procs[0].poll() is None and time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()
            time.sleep(0.2)
        node_ids = [a["node-id"] for a in flwr_json(env, *(["supernode", "register", str(public), "test"]
                                                           for _, public in pairs))]
        configs = [(["--auth-supernode-private-key", str(private)], c) for (private, _), c in zip(pairs, node_configs,
                                                                                               strict=True)]
        if intruder is not None:
            configs.append((["--auth-supernode-private-key", str(intruder[0])], unregistered_config))
        if keyless_config is not None:
            configs.append(([], keyless_config))
        nodes = [_start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link}", "--root-certificates",
                         str(ca), *auth, "--port", str(_free_port()), "--node-config", node_config],
                        tmp_path / f"node{i}.log", env)
                 for i, (auth, node_config) in enumerate(configs)]
        procs += nodes
        yield env, nodes, node_ids, intruder[1] if intruder else None
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def flwr_run(tmp_path: Path, env: dict, overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config",
         f"config='configs/smoke.toml' out-dir='{tmp_path / 'runs'}' overrides='{overrides}'"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_secured_flwr_run_where_one_client_raises_one_supernode_dies_and_intruders_are_refused(tmp_path):
    """Three registered SuperNodes under ``flwr run`` over TLS with SuperNode authentication, and two intruders: one
    claiming client 0's partition with a key that was never registered, one claiming client 1's with no key. Both
    are refused (each exits naming the refusal; the SuperLink logs the unknown key) and never join the federation.
    Client 1 raises at its training call (its state directory is a file); once the round's training is aggregated,
    the SuperNode of client 2 is killed (``kill -9``). The run goes on, names each failure by its client (absent, or
    the SuperLink's "node unavailable" error for it), and ends normally; client 0's owner then exports its model
    from its own machine."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    configs = [f"partition-id={i} num-partitions=3 state-dir='{blocker if i == 1 else tmp_path / f'state-{i}'}'"
               for i in range(3)]
    unregistered = f"partition-id=0 num-partitions=3 state-dir='{tmp_path / 'state-unregistered'}'"
    keyless = f"partition-id=1 num-partitions=3 state-dir='{tmp_path / 'state-keyless'}'"
    with federation(tmp_path, configs, unregistered, keyless) as (env, nodes, node_ids, unregistered_key):
        overrides = ("federation.num-clients=3 federation.num-rounds=1 algorithm.name=local "
                     "data.max-test-examples=2 data.max-val-examples=2 eval.before-training=false "
                     "federation.round-timeout-s=40")
        proc = flwr_run(tmp_path, env, overrides)
        # while the run starts, both intruders are refused and give up: the unregistered key at its activation
        assert nodes[3].wait(timeout=120) == 1
        log = (tmp_path / "node3.log").read_text()
        assert "Failed to initialize the connection to the SuperLink" in log and "Failed to activate SuperNode" in log
        # ... and the SuperLink names it: the unregistered key, in the PEM form it keeps keys in
        pem = serialization.load_ssh_public_key(unregistered_key.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        refused = [line for line in (tmp_path / "superlink.log").read_text().splitlines()
                   if "No SuperNode found with the given public key" in line]
        assert len(refused) == 1 and pem.splitlines()[1] in refused[0], refused
        # the keyless one at its self-registration, which SuperNode authentication turns off
        assert nodes[4].wait(timeout=120) == 1
        log = (tmp_path / "node4.log").read_text()
        assert "All SuperNodes must be registered via the CLI" in log, log
        # the federation is the three registered SuperNodes, online; neither intruder has a node id
        deadline = time.monotonic() + 60
        while True:
            listed = {n["node-id"]: n["status"] for n in flwr_json(env, ["supernode", "list", "test"])[0]["nodes"]}
            if set(listed.values()) == {"online"} or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert listed == {str(i): "online" for i in node_ids}, (listed, node_ids)
        deadline = time.monotonic() + 300
        while not any('"train"' in f.read_text() for f in (tmp_path / "runs").glob("*/metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.5)
        os.killpg(nodes[2].pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout
    runs = list((tmp_path / "runs").glob("smoke-*"))
    assert len(runs) == 1, stdout + (tmp_path / "superlink.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    why = {(r["round"], r["client"], r["phase"]): r["reason"] for r in rows if r["split"] == "rejected"}
    assert sorted(why) == [(1, 1, "train"), (1, 2, "evaluate")], why
    assert why[1, 1, "train"].startswith("client error") and "not-a-folder" in why[1, 1, "train"]
    # the dead node's client is named whether the round's deadline or the SuperLink's heartbeat check came first
    assert why[1, 2, "evaluate"] in ("absent: no reply within federation.round-timeout-s = 40 s",
                                     "client error: Error: Node Unavailable \u2014 The destination node failed to "
                                     "report a heartbeat within 2 \u00d7 its expected interval."), why
    assert sorted((r["round"], r["client"]) for r in rows if r["split"] == "train") == [(1, 0), (1, 2)]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["algorithm"] == "local" and set(summary["clients"]) == {"0", "1", "2"}
    assert summary["totals"]["rejected-replies"] == 2
    # each SuperNode kept its personal adapter in its own state directory, in a folder for this run; the refused
    # SuperNodes were never served a message
    assert (tmp_path / "state-0" / runs[0].name / "client-0" / "round-1.safetensors").is_file()
    assert not (tmp_path / "state-unregistered").exists() and not (tmp_path / "state-keyless").exists()
    # the owner of client 0 exports the model it was scored with, from its own state directory
    from fedhmoe.cli import main
    from fedhmoe.client.evaluate import evaluate_examples
    from fedhmoe.data.splits import client_data
    from fedhmoe.export import load_exported

    out = tmp_path / "client-0-model"
    assert main(["export", str(runs[0]), "--client", "0", "--state-dir", str(tmp_path / "state-0"),
                 "--out", str(out)]) == 0
    cm = load_exported(out)
    assert cm.client == 0 and cm.source == "personal" and cm.state
    test = client_data(cm.cfg, 0).test
    assert evaluate_examples(cm.model, cm.formatter, test, cm.cfg.eval, cm.device)["score"] == pytest.approx(
        summary["clients"]["0"]["final"], abs=1e-9)
