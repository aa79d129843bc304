"""Unit tests for common.config: schemas, defaults and the one YAML loader."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pydantic
import pytest

from common.config import (
    MIB,
    AdminConfig,
    ClientConfig,
    FileModel,
    GeneratedModel,
    JobConfig,
    ServerConfig,
)
from common.config_load import load_config, parse_config, yaml_path
from common.errors import ConfigError
from common.timeouts import (
    DEFAULT_COMMUNICATION_TIMEOUT_S,
    DEFAULT_STREAMING_ACK_WAIT_S,
    DEFAULT_STREAMING_READ_TIMEOUT_S,
    DEFAULT_TRAIN_TIMEOUT_S,
    Timeouts,
)

SERVER_MIN = "workspace: /srv/fl\n"
CLIENT_MIN = "name: site-1\nserver_url: http://127.0.0.1:8470\nworkspace: /data/site1\n"
JOB_MIN = textwrap.dedent(
    """\
    name: job_1
    num_rounds: 3
    min_clients: 2
    model:
      kind: generated
      num_tensors: 4
      tensor_mib: 1.5
    """
)


def _write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str, model: type[pydantic.BaseModel]) -> tuple[Path, ConfigError]:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, model)
    return path, exc.value


# --- defaults ------------------------------------------------------------------------


def test_timeout_default_constants() -> None:
    assert DEFAULT_COMMUNICATION_TIMEOUT_S == 300.0
    assert DEFAULT_STREAMING_ACK_WAIT_S == 300.0
    assert DEFAULT_STREAMING_READ_TIMEOUT_S == 300.0
    assert DEFAULT_TRAIN_TIMEOUT_S == 3600.0
    t = Timeouts()
    assert t.communication_timeout == 300.0
    assert t.streaming_ack_wait == 300.0
    assert t.streaming_read_timeout == 300.0


def test_server_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, SERVER_MIN), ServerConfig)
    assert cfg.workspace == Path("/srv/fl")
    assert cfg.host == "127.0.0.1"
    assert cfg.port == 8470
    assert cfg.url == "http://127.0.0.1:8470"
    assert cfg.timeouts == Timeouts(
        communication_timeout=300.0, streaming_ack_wait=300.0, streaming_read_timeout=300.0
    )
    assert cfg.transfer.io_chunk_kib == 1024
    assert cfg.transfer.io_chunk_bytes == 1024 * 1024
    assert cfg.segment_mib == 32
    assert cfg.segment_bytes == 32 * MIB == 33_554_432
    assert cfg.client_gone_after_s == 60.0
    assert cfg.long_poll_s == 20.0
    assert cfg.aggregation_chunk_mib == 2
    assert cfg.shutdown_timeout_s == 30.0
    assert cfg.log_level == "INFO"


def test_server_full_file(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        host: 0.0.0.0
        port: 0
        workspace: /w
        timeouts:
          communication_timeout: 12.5
          streaming_ack_wait: 600
          streaming_read_timeout: null
        transfer:
          io_chunk_kib: 4
        segment_mib: 1
        log_level: DEBUG
        allow_insecure: true
        """
    )
    cfg = load_config(_write(tmp_path, text), ServerConfig)
    assert cfg.host == "0.0.0.0"
    assert cfg.port == 0
    assert cfg.timeouts.communication_timeout == 12.5
    assert cfg.timeouts.streaming_ack_wait == 600.0
    assert cfg.timeouts.streaming_read_timeout is None
    assert cfg.transfer.io_chunk_bytes == 4096
    assert cfg.segment_bytes == MIB
    assert cfg.log_level == "DEBUG"


@pytest.mark.parametrize(
    "key", ["communication_timeout", "streaming_ack_wait", "streaming_read_timeout"]
)
def test_null_timeout_means_no_limit(tmp_path: Path, key: str) -> None:
    text = SERVER_MIN + f"timeouts:\n  {key}: null\n"
    cfg = load_config(_write(tmp_path, text), ServerConfig)
    assert getattr(cfg.timeouts, key) is None
    others = {"communication_timeout", "streaming_ack_wait", "streaming_read_timeout"} - {key}
    for other in others:
        assert getattr(cfg.timeouts, other) == 300.0


def test_client_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, CLIENT_MIN), ClientConfig)
    assert cfg.name == "site-1"
    assert cfg.server_url == "http://127.0.0.1:8470"
    assert cfg.workspace == Path("/data/site1")
    assert cfg.num_samples == 1
    assert cfg.timeouts == Timeouts()
    assert cfg.timeouts.communication_timeout == 300.0
    assert cfg.transfer.window == 4
    assert cfg.keep_spare_files_s == 600.0
    assert cfg.heartbeat_interval_s == 10.0
    assert cfg.retry_backoff_max_s == 10.0
    assert cfg.log_level == "INFO"


def test_admin_config(tmp_path: Path) -> None:
    text = "server_url: https://fl.example:443\ntls: {cert: a.pem, key: a.key, ca: ca.pem}\n"
    cfg = load_config(_write(tmp_path, text), AdminConfig)
    assert cfg.server_url == "https://fl.example:443"
    assert cfg.timeouts.streaming_ack_wait == 300.0


def test_job_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, JOB_MIN), JobConfig)
    assert cfg.name == "job_1"
    assert cfg.num_rounds == 3
    assert cfg.min_clients == 2
    assert cfg.clients is None
    assert cfg.train_timeout == 3600.0
    assert cfg.wait_for_clients_s is None
    assert isinstance(cfg.model, GeneratedModel)
    assert cfg.model.num_tensors == 4
    assert cfg.model.tensor_mib == 1.5
    assert cfg.model.tensor_shape is None
    assert cfg.model.dtype == "float32"
    assert cfg.model.init == "normal"
    assert cfg.model.seed == 0
    assert cfg.trainer.name == "add_epsilon"
    assert cfg.trainer.params == {}


def test_job_full(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        name: j.2
        num_rounds: 1
        min_clients: 2
        clients: [site-1, site_2, site.3]
        train_timeout: null
        wait_for_clients_s: 30
        model: {kind: file, path: /models/init.safetensors}
        trainer: {name: "pkg.mod:make", params: {lr: 0.1, steps: 3}}
        """
    )
    cfg = load_config(_write(tmp_path, text), JobConfig)
    assert cfg.clients == ["site-1", "site_2", "site.3"]
    assert cfg.train_timeout is None
    assert cfg.wait_for_clients_s == 30.0
    assert isinstance(cfg.model, FileModel)
    assert cfg.model.path == Path("/models/init.safetensors")
    assert cfg.trainer.name == "pkg.mod:make"
    assert cfg.trainer.params == {"lr": 0.1, "steps": 3}


def test_job_tensor_shape(tmp_path: Path) -> None:
    text = JOB_MIN.replace("tensor_mib: 1.5", "tensor_shape: [2, 3]\n  dtype: float16")
    cfg = load_config(_write(tmp_path, text), JobConfig)
    assert isinstance(cfg.model, GeneratedModel)
    assert cfg.model.tensor_shape == [2, 3]
    assert cfg.model.tensor_mib is None
    assert cfg.model.dtype == "float16"


def test_job_clients_equal_to_min_is_ok(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, JOB_MIN + "clients: [a, b]\n"), JobConfig)
    assert cfg.clients == ["a", "b"]


def test_configs_are_frozen(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, SERVER_MIN), ServerConfig)
    with pytest.raises(pydantic.ValidationError):
        cfg.port = 1  # type: ignore[misc]


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (
            SERVER_MIN + "timeouts:\n  comunication_timeout: 5\n",
            "timeouts.comunication_timeout",
            "unknown key",
        ),
        (SERVER_MIN + "prot: 8000\n", "prot", "unknown key"),
        (
            SERVER_MIN + "timeouts:\n  communication_timeout: -1\n",
            "timeouts.communication_timeout",
            "greater than 0",
        ),
        (
            SERVER_MIN + "timeouts:\n  communication_timeout: 0\n",
            "timeouts.communication_timeout",
            "greater than 0",
        ),
        (
            SERVER_MIN + "timeouts:\n  streaming_ack_wait: 0\n",
            "timeouts.streaming_ack_wait",
            "greater than 0",
        ),
        (
            SERVER_MIN + "timeouts:\n  streaming_read_timeout: -0.5\n",
            "timeouts.streaming_read_timeout",
            "greater than 0",
        ),
        (
            SERVER_MIN + "timeouts:\n  communication_timeout: fast\n",
            "timeouts.communication_timeout",
            "'fast'",
        ),
        (SERVER_MIN + "port: abc\n", "port", "valid integer"),
        (SERVER_MIN + "port: 70000\n", "port", "65535"),
        (SERVER_MIN + "timeouts: 5\n", "timeouts", "(got 5)"),
        (SERVER_MIN + "transfer:\n  window: 4\n", "transfer.window", "unknown key"),
        (SERVER_MIN + "segment_mib: 0\n", "segment_mib", "greater than 0"),
        (SERVER_MIN + "log_level: TRACE\n", "log_level", "'TRACE'"),
        ("port: 1\n", "workspace", "required but missing"),
    ],
    ids=[
        "unknown-nested",
        "unknown-top",
        "negative-timeout",
        "zero-timeout",
        "zero-ack",
        "negative-read",
        "timeout-str",
        "port-str",
        "port-range",
        "timeouts-not-mapping",
        "window-is-the-sites",
        "segment-zero",
        "log-level",
        "missing-workspace",
    ],
)
def test_server_errors_name_file_and_field(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    path, err = _error(tmp_path, text, ServerConfig)
    msg = str(err)
    assert msg.startswith(f"{path}: invalid configuration:")
    assert f"  {field}: " in msg
    assert words in msg
    assert err.field == field
    assert err.code == "config_invalid"


def test_several_errors_are_all_listed(tmp_path: Path) -> None:
    text = "port: -1\ntimeouts:\n  streaming_ack_wait: 0\nbogus: 1\n"
    _, err = _error(tmp_path, text, ServerConfig)
    msg = str(err)
    for field in ("workspace", "port", "timeouts.streaming_ack_wait", "bogus"):
        assert f"  {field}: " in msg
    assert len(msg.splitlines()) == 5


def test_unknown_key_message_does_not_echo_value(tmp_path: Path) -> None:
    _, err = _error(tmp_path, SERVER_MIN + "secret_thing: hunter2\n", ServerConfig)
    assert "hunter2" not in str(err)
    assert "check the spelling" in str(err)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("server_url: http://h\nworkspace: /w\n", "name"),
        (CLIENT_MIN.replace("site-1", "-site"), "name"),
        (CLIENT_MIN.replace("site-1", "'site 1'"), "name"),
        (CLIENT_MIN.replace("site-1", "s" * 65), "name"),
        (CLIENT_MIN.replace("site-1", "'site/1'"), "name"),
        (CLIENT_MIN.replace("http://", "ftp://"), "server_url"),
        (CLIENT_MIN + "num_samples: 0\n", "num_samples"),
        (CLIENT_MIN + "heartbeat_interval_s: 0\n", "heartbeat_interval_s"),
        (CLIENT_MIN + "timeouts:\n  communication_timeout: 0\n", "timeouts.communication_timeout"),
    ],
    ids=[
        "missing-name",
        "name-leading-dash",
        "name-space",
        "name-too-long",
        "name-slash",
        "url-scheme",
        "samples-zero",
        "heartbeat-zero",
        "timeout-zero",
    ],
)
def test_client_errors(tmp_path: Path, text: str, field: str) -> None:
    path, err = _error(tmp_path, text, ClientConfig)
    assert str(path) in str(err)
    assert f"  {field}: " in str(err)
    assert err.field == field


@pytest.mark.parametrize("name", ["a", "A1", "site-1", "s_2.b", "9" + "x" * 63])
def test_client_good_names(tmp_path: Path, name: str) -> None:
    cfg = load_config(_write(tmp_path, CLIENT_MIN.replace("site-1", name)), ClientConfig)
    assert cfg.name == name


def test_job_rejects_fewer_clients_than_min(tmp_path: Path) -> None:
    path, err = _error(tmp_path, JOB_MIN + "clients: [only-one]\n", JobConfig)
    msg = str(err)
    assert str(path) in msg
    assert "min_clients is 2 but only 1 clients listed" in msg
    # The input of a model validator is the whole file: it is not echoed.
    assert "(got" not in msg
    assert "num_rounds" not in msg


def test_job_rejects_bad_client_name(tmp_path: Path) -> None:
    _, err = _error(tmp_path, JOB_MIN + "clients: [good, 'bad name']\n", JobConfig)
    assert err.field == "clients.1"
    assert "  clients.1: " in str(err)
    assert "'bad name'" in str(err)


def test_job_rejects_bad_job_name(tmp_path: Path) -> None:
    _, err = _error(tmp_path, JOB_MIN.replace("job_1", "_job"), JobConfig)
    assert err.field == "name"


@pytest.mark.parametrize(
    "text",
    [
        JOB_MIN.replace("tensor_mib: 1.5", "tensor_mib: 1.5\n  tensor_shape: [4]"),
        JOB_MIN.replace("  tensor_mib: 1.5\n", ""),
    ],
    ids=["both", "neither"],
)
def test_generated_model_needs_exactly_one_size(tmp_path: Path, text: str) -> None:
    path, err = _error(tmp_path, text, JobConfig)
    assert str(path) in str(err)
    assert "  model: Value error, give exactly one of tensor_mib or tensor_shape\n" in f"{err}\n"
    assert err.field == "model"


def test_generated_model_direct() -> None:
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        GeneratedModel(num_tensors=1)
    with pytest.raises(pydantic.ValidationError, match="exactly one"):
        GeneratedModel(num_tensors=1, tensor_mib=1.0, tensor_shape=[1])
    assert GeneratedModel(num_tensors=1, tensor_shape=[3]).tensor_shape == [3]


@pytest.mark.parametrize(
    ("old", "new", "leaf"),
    [
        ("num_tensors: 4", "num_tensors: 0", "num_tensors"),
        ("tensor_mib: 1.5", "tensor_mib: -1", "tensor_mib"),
        ("tensor_mib: 1.5", "tensor_shape: [2, 0]", "tensor_shape.1"),
        ("tensor_mib: 1.5", "tensor_mib: 1\n  dtype: int8", "dtype"),
        ("tensor_mib: 1.5", "tensor_mib: 1\n  colour: red", "colour"),
    ],
)
def test_job_model_field_errors(tmp_path: Path, old: str, new: str, leaf: str) -> None:
    """The YAML path leaves out pydantic's union tag: ``model.x``, not ``model.generated.x``."""
    _, err = _error(tmp_path, JOB_MIN.replace(old, new), JobConfig)
    assert err.field == f"model.{leaf}"
    assert f"\n  model.{leaf}: " in str(err)


@pytest.mark.parametrize(
    ("model", "field", "words"),
    [
        ("{kind: file}", "model.path", "required but missing"),
        ("{kind: file, path: /m, file: x}", "model.file", "unknown key"),
        ("{kind: file, path: /m, num_tensors: 1}", "model.num_tensors", "unknown key"),
    ],
    ids=["missing-path", "key-named-like-tag", "generated-key-in-file"],
)
def test_job_file_model_errors(tmp_path: Path, model: str, field: str, words: str) -> None:
    text = JOB_MIN.split("model:")[0] + f"model: {model}\n"
    _, err = _error(tmp_path, text, JobConfig)
    assert err.field == field
    assert f"\n  {field}: {words}" in str(err)


def test_section_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    _, err = _error(tmp_path, SERVER_MIN + "timeouts: [1, 2]\n", ServerConfig)
    assert err.field == "timeouts"
    assert "(got" not in str(err)


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        ((), ""),
        (("name",), "name"),
        (("model", "generated", "num_tensors"), "model.num_tensors"),
        (("model", "generated", "tensor_shape", 1), "model.tensor_shape.1"),
        (("model", "file", "path"), "model.path"),
        (("model", "file", "file"), "model.file"),
        (("model",), "model"),
        (("clients", 1), "clients.1"),
        (("trainer", "params", "generated"), "trainer.params.generated"),
        (("unknown", "generated"), "unknown.generated"),
    ],
)
def test_yaml_path(loc: tuple[int | str, ...], path: str) -> None:
    assert yaml_path(JobConfig, loc) == path


def test_yaml_path_through_nested_model() -> None:
    assert yaml_path(ServerConfig, ("timeouts", "streaming_ack_wait")) == (
        "timeouts.streaming_ack_wait"
    )


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("num_rounds: 3", "num_rounds: 0", "num_rounds"),
        ("min_clients: 2", "min_clients: 0", "min_clients"),
        ("name: job_1\n", "", "name"),
        ("num_rounds: 3", "num_rounds: 3\ntrain_timeout: 0", "train_timeout"),
        ("num_rounds: 3", "num_rounds: 3\ntrain_timeout: -5", "train_timeout"),
    ],
)
def test_job_field_errors(tmp_path: Path, old: str, new: str, field: str) -> None:
    _, err = _error(tmp_path, JOB_MIN.replace(old, new), JobConfig)
    assert err.field == field
    assert f"  {field}: " in str(err)


def test_job_unknown_model_kind(tmp_path: Path) -> None:
    _, err = _error(tmp_path, JOB_MIN.replace("kind: generated", "kind: magic"), JobConfig)
    assert err.field is not None and err.field.startswith("model")
    assert "magic" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "server.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path, ServerConfig)
    assert str(exc.value) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path, ServerConfig)
    assert str(exc.value).startswith(f"{tmp_path}: cannot read")


@pytest.mark.parametrize("text", ["a: [1, 2\n", "a: b: c\n", "x: {\n", "\t- tab\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path, err = _error(tmp_path, text, ServerConfig)
    assert str(err).startswith(f"{path}: not valid YAML")


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n", "42\n", "null\n"]
)
def test_non_mapping_top_level(tmp_path: Path, text: str) -> None:
    path, err = _error(tmp_path, text, ServerConfig)
    assert str(err) == f"{path}: expected a mapping of settings at the top level"


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"workspace: /caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ServerConfig)
    assert str(exc.value) == (
        f"{path}: not UTF-8 text (byte 0xe9 at offset 15); save the file as UTF-8"
    )


def test_parse_config_uses_source_name() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"port": 1}, ServerConfig, source="<inline>")
    assert str(exc.value).startswith("<inline>: invalid configuration:")
    assert exc.value.field == "workspace"
    cfg = parse_config({"workspace": "/x"}, ServerConfig, source="<inline>")
    assert cfg.workspace == Path("/x")
