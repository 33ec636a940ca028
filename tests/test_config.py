"""ombot.toml: every error names the file, the key path and what was expected; how the file is found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ombot.keys import Identity
from ombot import config as cfg
from ombot.errors import ConfigError
from tests.support import child_env

BOT, BJ1, BJ2, SH1 = (Identity.generate().public for _ in range(4))

VALID = f"""\
[client]
id = "ops"
default_idc = "bj"

[clients.bot]
kind = "chat"
public_key = "{BOT}"
key_file = "keys/bot.key"
modules = ["*"]
hosts = ["*"]

[clients.ops]
kind = "cli"
user = "alice"
public_key = "{SH1}"
key_file = "keys/ops.key"
modules = ["facts", "service"]
hosts = ["web*"]

[idcs.bj]
masters = ["bj-1", "bj-2"]

[idcs.sh]
masters = ["sh-1"]

[masters.bj-1]
idc = "bj"
address = "10.0.0.1:7001"
public_key = "{BJ1}"
key_file = "keys/bj-1.key"
inventory = "inventory/bj.ini"
accept = ["bot", "ops"]

[masters.bj-1.limits]
job_timeout_seconds = 120

[masters.bj-2]
idc = "bj"
address = "[::1]:7002"
public_key = "{BJ2}"
backend = "local"
state_dir = "/var/lib/ombot"

[masters.sh-1]
idc = "sh"
address = "sh-master.example:7001"
public_key = "{SH1}"

[modules]
dirs = ["my-modules"]
"""


@pytest.fixture(autouse=True)
def no_database_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMBOT_MASTER_DATABASE_URL", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ombot.toml"
    path.write_text(text)
    return path


def replace(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def config_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        cfg.load(path)
    assert str(caught.value).startswith(f"{path.resolve()}: "), "the message names the file first"
    return caught.value


# --- a good file ---------------------------------------------------------------------------------


def test_a_valid_file_and_its_defaults(tmp_path: Path) -> None:
    conf = cfg.load(write(tmp_path, VALID))
    base = tmp_path.resolve()
    assert conf.client == cfg.ClientSettings("ops", base / "keys/ops.key", "bj")
    assert conf.clients == {
        "bot": cfg.ClientRegistration("bot", BOT, "chat", "bot", base / "keys/bot.key", ("*",), ("*",)),
        "ops": cfg.ClientRegistration("ops", SH1, "cli", "alice", base / "keys/ops.key", ("facts", "service"), ("web*",)),
    }
    assert conf.clients["ops"].identity == "cli:alice"
    assert conf.idcs == {"bj": ("bj-1", "bj-2"), "sh": ("sh-1",)}
    assert conf.module_dirs == (base / "my-modules",)

    bj1, bj2, sh1 = conf.masters["bj-1"], conf.masters["bj-2"], conf.masters["sh-1"]
    assert (bj1.host, bj1.port, bj1.accept) == ("10.0.0.1", 7001, ("bot", "ops"))
    assert bj1.key_file == base / "keys/bj-1.key" and bj1.inventory == base / "inventory/bj.ini"
    assert bj1.limits == cfg.Limits(job_timeout_seconds=120)
    assert (bj2.host, bj2.port, bj2.state_dir) == ("::1", 7002, Path("/var/lib/ombot"))
    assert bj2.database_url == "sqlite:////var/lib/ombot/bj-2.db"
    # Everything left out takes its default.
    assert sh1.backend == "local" and sh1.accept == () and sh1.key_file is None and sh1.inventory is None
    assert sh1.state_dir == base / "state" and sh1.database_url == f"sqlite:///{base}/state/sh-1.db"
    assert sh1.limits == cfg.Limits()


def test_a_master_only_file_needs_no_client(tmp_path: Path) -> None:
    text = VALID.split("[clients.bot]")[1]
    conf = cfg.load(write(tmp_path, "[clients.bot]" + text))
    assert conf.client is None
    with pytest.raises(ConfigError, match=r": client: expected a \[client\] table"):
        conf.require_client()


def test_picking_a_master(tmp_path: Path) -> None:
    conf = cfg.load(write(tmp_path, VALID))
    assert conf.master("sh-1").id == "sh-1"
    with pytest.raises(ConfigError, match=r"masters\.nope: expected a \[masters\.NAME\] table"):
        conf.master("nope")
    with pytest.raises(ConfigError, match=r"masters: expected exactly one master, or --id NAME"):
        conf.master()


# --- the file itself ----------------------------------------------------------------------------


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        cfg.load(tmp_path / "nope.toml")
    assert str(caught.value) == f"{tmp_path.resolve()}/nope.toml: expected an existing file (create one with `ombot init DIR`)"


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    text = replace('idc = "sh"', "idc = sh")
    line = text.splitlines().index("idc = sh") + 1
    error = config_error(tmp_path, text)
    assert "expected valid TOML" in str(error) and f"line {line}," in str(error)


# --- each table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["id", "default_idc"])
def test_client_keys_are_required(tmp_path: Path, key: str) -> None:
    line = next(line for line in VALID.splitlines() if line.startswith(f"{key} = "))
    error = config_error(tmp_path, replace(line + "\n", ""))
    assert error.key == f"client.{key}" and "(missing)" in str(error)


def test_the_cli_client_must_be_registered_with_a_key(tmp_path: Path) -> None:
    error = config_error(tmp_path, replace('id = "ops"', 'id = "nobody"'))
    assert error.key == "client.id" and "a client id defined under [clients] (bot, ops), got 'nobody'" in str(error)
    error = config_error(tmp_path, replace('key_file = "keys/ops.key"\n', ""))
    assert error.key == "clients.ops.key_file"


def test_another_registration_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = cfg.load(write(tmp_path, VALID))
    monkeypatch.setenv(cfg.CLIENT_ENV, "bot")
    assert conf.require_client() == cfg.ClientSettings("bot", tmp_path.resolve() / "keys/bot.key", "bj")
    monkeypatch.setenv(cfg.CLIENT_ENV, "ghost")
    with pytest.raises(ConfigError, match=r"clients\.ghost: expected a \[clients\.NAME\] table"):
        conf.require_client()


@pytest.mark.parametrize("old, new, key, expected", [
    ('kind = "cli"', 'kind = "root"', "clients.ops.kind", "expected one of chat, console, cli, agent, got 'root'"),
    ('kind = "cli"\n', "", "clients.ops.kind", "(missing)"),
    ('user = "alice"', 'user = "Alice"', "clients.ops.user", "got 'Alice'"),
    ('user = "alice"', 'user = "al ice"', "clients.ops.user", "got 'al ice'"),
    ('hosts = ["web*"]', 'hosts = "web*"', "clients.ops.hosts", "expected a list of strings"),
])
def test_a_bad_registration(tmp_path: Path, old: str, new: str, key: str, expected: str) -> None:
    error = config_error(tmp_path, replace(old, new))
    assert error.key == key and expected in str(error), str(error)


def test_the_default_idc_must_exist(tmp_path: Path) -> None:
    error = config_error(tmp_path, replace('default_idc = "bj"', 'default_idc = "gz"'))
    assert error.key == "client.default_idc"
    assert str(error).endswith("expected one of the IDCs under [idcs] (bj, sh), got 'gz'")


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:", ":7001", "10.0.0.1:99999", "10.0.0.1:http",
                                     "::1:7001", "[10.0.0.1]:7001", "[::1]"])
def test_a_bad_address(tmp_path: Path, address: str) -> None:
    error = config_error(tmp_path, replace('"10.0.0.1:7001"', f'"{address}"'))
    assert error.key == "masters.bj-1.address"
    assert "expected 'host:port'" in str(error) and str(error).endswith(f", got {address!r}")


def test_an_address_must_be_a_string(tmp_path: Path) -> None:
    error = config_error(tmp_path, replace('"10.0.0.1:7001"', "7001"))
    assert error.key == "masters.bj-1.address" and str(error).endswith(", got 7001")


def test_accept_names_only_known_clients(tmp_path: Path) -> None:
    error = config_error(tmp_path, replace('accept = ["bot", "ops"]', 'accept = ["bot", "intruder"]'))
    assert error.key == "masters.bj-1.accept" and "unknown 'intruder'" in str(error)


def test_an_idc_names_only_known_masters(tmp_path: Path) -> None:
    error = config_error(tmp_path, replace('masters = ["bj-1", "bj-2"]', 'masters = ["bj-1", "bj-9"]'))
    assert error.key == "idcs.bj.masters" and "master ids defined under [masters]; unknown 'bj-9'" in str(error)


def test_an_idc_names_only_its_own_masters(tmp_path: Path) -> None:
    error = config_error(tmp_path, replace('masters = ["bj-1", "bj-2"]', 'masters = ["bj-1", "sh-1"]'))
    assert error.key == "idcs.bj.masters" and "masters of IDC 'bj'; 'sh-1' is in 'sh'" in str(error)


def test_an_idc_needs_a_master(tmp_path: Path) -> None:
    text = replace('masters = ["sh-1"]', "masters = []", replace('address = "sh-master.example:7001"', 'address = "h:1"'))
    assert config_error(tmp_path, text).key == "idcs.sh.masters"


@pytest.mark.parametrize("old, new, key, expected", [
    ("job_timeout_seconds = 120", 'job_timeout_seconds = "2m"', "masters.bj-1.limits.job_timeout_seconds",
     "expected an integer, got '2m'"),
    ("job_timeout_seconds = 120", "job_timeout_seconds = true", "masters.bj-1.limits.job_timeout_seconds",
     "expected an integer, got True"),
    ("job_timeout_seconds = 120", "job_timeout_seconds = 0", "masters.bj-1.limits.job_timeout_seconds",
     "expected a positive integer, got 0"),
    ('accept = ["bot", "ops"]', 'accept = "bot"', "masters.bj-1.accept", "expected a list of strings, got 'bot'"),
    ('accept = ["bot", "ops"]', 'accept = ["bot", 7]', "masters.bj-1.accept", "expected a list of strings, got ['bot', 7]"),
    ('idc = "sh"', "idc = 3", "masters.sh-1.idc", "expected a string, got 3"),
    ('idc = "sh"', 'idc = "s h"', "masters.sh-1.idc", "expected a name of letters, digits, '.', '_' or '-', got 's h'"),
    ('backend = "local"', "backend = false", "masters.bj-2.backend", "expected a string, got False"),
    ('key_file = "keys/bot.key"', "key_file = 1", "clients.bot.key_file", "expected a file path, got 1"),
    ('dirs = ["my-modules"]', 'dirs = "my-modules"', "modules.dirs", "expected a list of strings, got 'my-modules'"),
    (f'public_key = "{BJ2}"', 'public_key = "not-a-key"', "masters.bj-2.public_key",
     "expected a base64 public key of 32 bytes (as printed by `ombot keygen`), got 'not-a-key'"),
    (f'public_key = "{BOT}"', 'public_key = "AAAA"', "clients.bot.public_key",
     "expected a base64 public key of 32 bytes (as printed by `ombot keygen`), got 'AAAA'"),
    ("[masters.bj-1.limits]", "[masters.bj-1.limitz]", "masters.bj-1.limitz", "did you mean 'limits'?"),
    ('backend = "local"', 'backnd = "local"', "masters.bj-2.backnd", "did you mean 'backend'?"),
    ("job_timeout_seconds = 120", "job_timeout = 120", "masters.bj-1.limits.job_timeout",
     "did you mean 'job_timeout_seconds'?"),
    ('default_idc = "bj"\n', 'default_idc = "bj"\nidc = "bj"\n', "client.idc", "known: default_idc, id"),
], ids=lambda value: "public_key" if value in (f'public_key = "{BJ2}"', f'public_key = "{BOT}"') else None)  # fresh keys: ids stay the same in every process (xdist)
def test_wrong_types_and_unknown_keys(tmp_path: Path, old: str, new: str, key: str, expected: str) -> None:
    error = config_error(tmp_path, replace(old, new))
    assert error.key == key and expected in str(error), str(error)


def test_a_table_where_a_value_belongs(tmp_path: Path) -> None:
    error = config_error(tmp_path, 'masters = "bj-1"\n')
    assert error.key == "masters" and "expected a table, got 'bj-1'" in str(error)


def test_other_components_keep_their_own_top_level_tables(tmp_path: Path) -> None:
    conf = cfg.load(write(tmp_path, VALID + '\n[slack]\nchannel = "#ops"\n'))
    assert conf.raw["slack"] == {"channel": "#ops"}


# --- which file: --config, $OMBOT_CONFIG, ./ombot.toml -------------------------------------------


def marked_config(directory: Path) -> Path:
    """A config whose error names it, so the CLI's message tells which file it read."""
    directory.mkdir(parents=True, exist_ok=True)
    return write(directory, replace('default_idc = "bj"', f'default_idc = "from-{directory.name}"'))


def ombot(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=child_env(env))


def read_file(result: subprocess.CompletedProcess[str]) -> str:
    """Which config the CLI loaded, from its error message."""
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return result.stderr.split("error: ", 1)[1].split(": ", 1)[0]


@pytest.fixture
def two_configs(tmp_path: Path) -> tuple[Path, Path]:
    return marked_config(tmp_path / "a").resolve(), marked_config(tmp_path / "b").resolve()


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_option_before_or_after_the_subcommand(tmp_path: Path, two_configs: tuple[Path, Path],
                                                      where: str) -> None:
    a, _ = two_configs
    args = ["--config", str(a), "masters"] if where == "before" else ["masters", "--config", str(a)]
    result = ombot(*args, cwd=tmp_path)
    assert read_file(result) == str(a) and "client.default_idc" in result.stderr and "'from-a'" in result.stderr


def test_config_from_the_environment(tmp_path: Path, two_configs: tuple[Path, Path]) -> None:
    a, _ = two_configs
    assert read_file(ombot("masters", cwd=tmp_path, env={"OMBOT_CONFIG": str(a)})) == str(a)


def test_the_option_after_the_subcommand_beats_the_environment(tmp_path: Path, two_configs: tuple[Path, Path]) -> None:
    a, b = two_configs
    assert read_file(ombot("masters", "--config", str(a), cwd=tmp_path, env={"OMBOT_CONFIG": str(b)})) == str(a)


def test_the_option_before_the_subcommand_beats_the_environment(tmp_path: Path, two_configs: tuple[Path, Path]) -> None:
    a, b = two_configs
    assert read_file(ombot("--config", str(a), "masters", cwd=tmp_path, env={"OMBOT_CONFIG": str(b)})) == str(a)


def test_the_default_is_ombot_toml_in_the_working_directory(tmp_path: Path, two_configs: tuple[Path, Path]) -> None:
    _, b = two_configs
    assert read_file(ombot("masters", cwd=b.parent)) == str(b)


def test_no_config_anywhere(tmp_path: Path) -> None:
    result = ombot("masters", cwd=tmp_path)
    assert read_file(result) == str(tmp_path.resolve() / "ombot.toml")
    assert "expected an existing file (create one with `ombot init DIR`)" in result.stderr
