"""The config schema: shipped defaults, resolution of paths, and one-line errors for bad files."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import ConfigError, NodeConfig, check_ports_free, load_config
from dicom_node.paths import DEFAULT_CONFIG, DEFAULT_RULES, PROJECT_ROOT

runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_shipped_file_equals_schema_defaults() -> None:
    # node.yaml is the one documented list of defaults: it must not drift from the schema.
    assert load_config(DEFAULT_CONFIG) == NodeConfig().resolved(DEFAULT_CONFIG.parent)


def test_every_shipped_key_has_a_comment() -> None:
    for line in DEFAULT_CONFIG.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"no comment on: {line!r}"


def test_defaults_resolve_to_project_paths() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.node.ae_title == "ILD_NODE"
    assert config.node.port == 11112
    assert config.rules == DEFAULT_RULES
    assert config.storage.root == PROJECT_ROOT / "var" / "storage"
    assert config.database.url == f"sqlite:///{PROJECT_ROOT / 'var' / 'node.db'}"
    assert config.model.path == PROJECT_ROOT / "models" / "ild-demo.safetensors"


def test_partial_file_takes_defaults_and_resolves_relative_to_itself(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "node: {port: 4104}\nstorage: {root: data}\nrules: my_rules.yaml\n"
        "destinations:\n  - {name: pacs, ae_title: ORTHANC, host: 127.0.0.1, port: 4242}\n",
    )
    config = load_config(path)
    assert config.node.port == 4104
    assert config.node.ae_title == "ILD_NODE"
    assert config.storage.root == tmp_path.resolve() / "data"
    assert config.rules == tmp_path.resolve() / "my_rules.yaml"
    assert config.destinations[0].ae_title == "ORTHANC"
    assert config.completion.series_quiet_seconds == 30


def test_postgres_url_is_kept_verbatim(tmp_path: Path) -> None:
    url = "postgresql+psycopg://node@db.example/ild"
    assert load_config(write(tmp_path, f"database: {{url: '{url}'}}\n")).database.url == url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node: {prot: 104}\n", "node.prot: unknown key"),
        ("node: {port: abc}\n", "node.port: expected a valid integer"),
        ("node: {port: 70000}\n", "node.port: expected less than or equal to 65535, got 70000"),
        ("node: {ae_title: WAY_TOO_LONG_AE_TITLE}\n", "node.ae_title: expected an AE title of 1-16"),
        ("completion: {series_quiet_seconds: -1}\n", "completion.series_quiet_seconds: expected greater than 0, got -1"),
        ("destinations:\n  - {name: pacs, host: h, port: 1}\n", "destinations.0.ae_title: required key is missing"),
        ("database: {url: 'mysql://x'}\n", "database.url: expected a SQLAlchemy URL"),
        ("node: {bind_address: everywhere}\n", "node.bind_address: expected an IPv4 or IPv6 address"),
        ("web: {port: 11112}\n", "(top level): expected node.port and web.port to differ"),
        ("- just\n- a list\n", "(top level): expected a mapping"),
        ("node: {port: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_gives_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")


def test_port_in_use_is_reported_with_the_key(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        path = write(tmp_path, f"node: {{port: {port}, bind_address: 127.0.0.1}}\nweb: {{port: 1}}\n")
        config = load_config(path)
        expected = rf"node\.port: expected a free TCP port, but 127\.0\.0\.1:{port} is already in use"
        with pytest.raises(ConfigError, match=expected):
            check_ports_free(config, path)


def test_cli_config_check_and_show(tmp_path: Path) -> None:
    ok = runner.invoke(app, ["config", "check", "--config", str(DEFAULT_CONFIG)])
    assert ok.exit_code == 0, ok.output
    shown = runner.invoke(app, ["config", "show", "--config", str(DEFAULT_CONFIG)])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.stdout)["node"]["ae_title"] == "ILD_NODE"
    bad = runner.invoke(app, ["config", "check", "--config", str(write(tmp_path, "node: {prot: 1}\n"))])
    assert bad.exit_code == 2
    assert "node.prot: unknown key" in bad.stderr


def test_serve_with_a_missing_model_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dicom_port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    path = write(tmp_path, f"node: {{port: {dicom_port}, bind_address: 127.0.0.1}}\nweb: {{port: {web_port}}}\n"
                 "model: {path: nowhere.safetensors}\n")
    result = runner.invoke(app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "model.path" in result.stderr and "does not exist" in result.stderr


# --- a site's own config outside the checkout: shipped files stay the shipped ones -------------------------------

ONE_KEY_CONFIGS = {
    "port": "node: {port: 11555}\n",
    "ae_title": "node: {ae_title: SITE_NODE}\n",
    "device": "model: {device: cpu}\n",
    "storage": "storage: {root: data}\n",
    "logging": "logging: {level: DEBUG}\n",
}


@pytest.mark.parametrize("name", sorted(ONE_KEY_CONFIGS))
def test_one_key_site_config_keeps_the_shipped_model_and_rules(tmp_path: Path, name: str) -> None:
    site = tmp_path / "srv" / "site"
    site.mkdir(parents=True)
    path = write(site, ONE_KEY_CONFIGS[name])
    config = load_config(path)
    assert config.model.path == PROJECT_ROOT / "models" / "ild-demo.safetensors"
    assert config.rules == DEFAULT_RULES
    # data folders left out belong to the site's config, as if node.yaml's ../var/... were written in it
    expected_root = site.resolve() / "data" if name == "storage" else (site / ".." / "var" / "storage").resolve()
    assert config.storage.root == expected_root
    checked = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert checked.exit_code == 0, checked.output
    shown = yaml.safe_load(runner.invoke(app, ["config", "show", "--config", str(path)]).stdout)
    assert shown["model"]["path"] == str(PROJECT_ROOT / "models" / "ild-demo.safetensors")
    assert shown["rules"] == str(DEFAULT_RULES)


def test_paths_the_site_writes_resolve_against_its_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "model: {path: weights/m.safetensors}\nrules: site_rules.yaml\n"))
    assert config.model.path == tmp_path.resolve() / "weights" / "m.safetensors"
    assert config.rules == tmp_path.resolve() / "site_rules.yaml"


@pytest.mark.parametrize(("text", "expected"), [
    ("model: {path: nowhere.safetensors}\n", r"model\.path: .*nowhere\.safetensors does not exist"),
    ("rules: missing_rules.yaml\n", r"rules: .*missing_rules\.yaml: rules file not found"),
    ("rules: bad_rules.yaml\n", r"rules: .*bad_rules\.yaml"),
    ("model: {path: not_a_model.safetensors}\n", r"model\.path: .*not_a_model\.safetensors"),
])
def test_config_check_fails_for_what_serve_refuses(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "bad_rules.yaml").write_text("presets: 3\n")
    (tmp_path / "not_a_model.safetensors").write_bytes(b"\x00" * 64)
    path = write(tmp_path, text)
    checked = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert checked.exit_code == 2
    assert checked.stderr.count("\n") == 1 and re.search(expected, checked.stderr), checked.stderr


@pytest.mark.slow
def test_serve_starts_on_a_site_config_that_sets_only_its_port(tmp_path: Path) -> None:
    """`serve` on a config in a folder of its own naming only where to listen: bundled model, shipped rules."""
    from node_harness import NodeProcess, free_port

    site = tmp_path / "srv" / "site"
    site.mkdir(parents=True)
    path = write(site, f"node: {{port: {free_port()}, bind_address: 127.0.0.1}}\nweb: {{enabled: false}}\n")
    with NodeProcess(path) as node:
        echoed = node.cli("echo", "127.0.0.1", str(node.port), "ILD_NODE")
        assert echoed.returncode == 0, echoed.stderr
    assert node.proc is not None and node.proc.returncode == 0, node.log()[-3000:]
    assert (tmp_path / "srv" / "var" / "node.db").is_file()  # its data beside its config, not in the checkout
