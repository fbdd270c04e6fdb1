"""What the server tells a client each round: one typed, versioned dataclass carried in the message's config record.

The client runtime only executes :class:`Instructions`: which adapters to carry, what to start from, how to train,
which client hooks to run (statistics to collect, gradient corrections), where its personal state lives and how
tensors travel. The config record holds ``protocol-version``, the experiment TOML (``run-config``) and every other
field as one JSON object (``instructions``, kebab-case keys); reading a record with a missing or unknown field, or
another version, raises :class:`ProtocolError` naming it, so a typo can never silently become a default. Imports
neither torch nor Flower.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from fedhmoe.specs import AdapterSpec

__all__ = ["PROTOCOL_VERSION", "Instructions", "ProtocolError"]

#: Raised on both sides when they disagree; bump it with any change of the fields below.
PROTOCOL_VERSION = 1
_VERSION_KEY, _RUN_CONFIG_KEY, _BODY_KEY = "protocol-version", "run-config", "instructions"


class ProtocolError(ValueError):
    """A message's instructions are missing a field, hold an unknown one, or speak another protocol version."""


@dataclass(frozen=True)
class Instructions:
    """One round's instructions to one client (a training or an evaluation message).

    Attributes:
        client: The partition id the message is for (checked against the node's own).
        server_round: The round; personal state is saved under it and read from before it.
        algorithm: Registry name of the method (it names the run in errors; the client does not branch on it).
        run_config: The resolved experiment config as TOML (model, data, training settings).
        adapter: The adapters the client's model carries this round.
        wire_dtype: Transport dtype of tensors both ways (``float32`` or ``bfloat16``).
        state_dir: Where the client keeps personal state (the run's ``clients/`` folder), unless its node config
            names its own ``state-dir``.
        run_key: The run's folder name inside a node's own ``state-dir``.
        learning_rate: Local learning rate of this round (training).
        return_arrays: Reply with the trained tensors (training).
        save_personal: Save the trained tensors as personal state (training).
        proximal_mu: Weight of FedProx's proximal term; 0 adds none.
        hooks: Client hooks to run, by name, in order (see :mod:`fedhmoe.client.hooks`), e.g. ``scaffold``,
            ``amole-stats``, ``moe-profile``.
        dp_eta: ``amole-stats``: metric-DP noise on the uploaded embeddings (0: none).
        num_experts: ``moe-profile``: experts per MoE layer of the profile.
        validate: ``moe-profile``: also report the validation score (``val-score``).
    """

    client: int
    server_round: int
    algorithm: str
    run_config: str
    adapter: AdapterSpec
    wire_dtype: str = "float32"
    state_dir: str = ""
    run_key: str = ""
    learning_rate: float = 0.0
    return_arrays: bool = True
    save_personal: bool = False
    proximal_mu: float = 0.0
    hooks: tuple[str, ...] = ()
    dp_eta: float = 0.0
    num_experts: int = 0
    validate: bool = False

    def replace(self, **changes: Any) -> Instructions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        """The config record's entries: ``protocol-version``, ``run-config`` (the TOML) and ``instructions`` (every
        other field, kebab-case, as one JSON object; Flower's records hold no empty strings and no nesting)."""
        body: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, AdapterSpec):
                value = json.loads(value.to_json())
            elif isinstance(value, tuple):
                value = list(value)
            if f.name != "run_config":
                body[f.name.replace("_", "-")] = value
        return {_VERSION_KEY: PROTOCOL_VERSION, _RUN_CONFIG_KEY: self.run_config, _BODY_KEY: json.dumps(body)}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> Instructions:
        """Read :meth:`to_config`'s entries back.

        Raises:
            ProtocolError: The version differs, or a field is missing, unknown or of the wrong type.
        """
        version = record.get(_VERSION_KEY)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"message speaks protocol version {version!r}, this client {PROTOCOL_VERSION}: "
                                "run the same fedhmoe on the server and the clients")
        unknown = sorted(set(record) - {_VERSION_KEY, _RUN_CONFIG_KEY, _BODY_KEY})
        if unknown or _BODY_KEY not in record or _RUN_CONFIG_KEY not in record:
            raise ProtocolError(f"message config must hold {_VERSION_KEY}, {_RUN_CONFIG_KEY} and {_BODY_KEY}; "
                                f"it holds {sorted(record)}")
        try:
            body = json.loads(str(record[_BODY_KEY]))
        except ValueError as e:
            raise ProtocolError(f"message instructions are not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ProtocolError("message instructions must be a JSON object")
        body[_RUN_CONFIG_KEY] = record[_RUN_CONFIG_KEY]
        hints, names = _field_types(cls)
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise ProtocolError(f"message instructions hold unknown fields {unknown}")
        missing = sorted(k for k in names if k not in body)
        if missing:
            raise ProtocolError(f"message instructions lack fields {missing}")
        return cls(**{name: _read(key, body[key], hints[name]) for key, name in names.items()})


_FIELD_TYPES: dict[type, tuple[dict[str, Any], dict[str, str]]] = {}


def _field_types(cls: type) -> tuple[dict[str, Any], dict[str, str]]:
    """A dataclass's resolved field types and its fields by wire name (resolving them costs more than reading a
    message, so once per class)."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = get_type_hints(cls), {f.name.replace("_", "-"): f.name for f in fields(cls)}
    return _FIELD_TYPES[cls]


def _read(key: str, value: Any, typ: Any) -> Any:
    """One field's value, checked against its type (an int is a valid float)."""
    try:
        if typ is AdapterSpec:
            return AdapterSpec.from_json(json.dumps(value))
        if typ == tuple[str, ...]:
            if isinstance(value, list) and all(isinstance(x, str) for x in value):
                return tuple(value)
        elif typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif typ is bool and isinstance(value, bool):
            return value
        elif typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif typ is str and isinstance(value, str):
            return value
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"message instruction '{key}' cannot be read: {e}") from e
    raise ProtocolError(f"message instruction '{key}' must be {getattr(typ, '__name__', typ)}, got {value!r}")
