"""deploy/ and config/examples/: the Dockerfiles lint clean and run deploy/install.sh, which installs a working node
in a fresh venv; compose wires the node and Orthanc as deploy/orthanc/ expects; the systemd unit verifies; every
shipped configuration loads; the shipped rules classify each vendor's real and synthetic series with that vendor's
presets.

No Docker engine is available here: the images are never built; what they run is tested instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from node_harness import free_port, wait_for
from orthanc_harness import ORTHANC, load_orthanc_config

from dicom_node import __version__
from dicom_node.config import NodeConfig, load_config
from dicom_node.headers import scan_directory
from dicom_node.paths import DEFAULT_RULES, PROJECT_ROOT
from dicom_node.rules import RuleSet, assign_roles, assign_studies, load_rules
from training.phantom import Vendor, generate_study
from training.phantom.dicom_writer import plan_study, write_dicom_study

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "config" / "examples"
REAL = ROOT.parent / "shared" / "data" / "real-dicom"
VENV_BIN = Path(sys.executable).parent
NODE_DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed (hadolint: the dev extras, `pip install -e .[dev]`)"
    return found


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """A command's exit status and output, never raising on failure (the tests assert on them)."""
    return subprocess.run(args, check=False, capture_output=True, text=True, **kwargs)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


# ------------------------------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("name", [*NODE_DOCKERFILES, "Dockerfile.orthanc"])
def test_dockerfile_passes_hadolint(name: str) -> None:
    r = run([tool("hadolint"), "--no-color", str(DEPLOY / name)], timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("name", NODE_DOCKERFILES)
def test_dockerfile_runs_the_install_script_as_a_non_root_user(name: str) -> None:
    steps = instructions(DEPLOY / name)
    kinds = [k for k, _ in steps]
    assert kinds.count("FROM") == 2, "multi-stage: a build stage and a runtime stage"
    runs = [args for k, args in steps if k == "RUN"]
    assert any("deploy/install.sh /opt/venv /opt/ild-node" in r for r in runs), runs
    assert not any("pip install" in r for r in runs), "install commands belong in deploy/install.sh"
    # Everything install.sh and the node need is copied (the fresh-venv test copies the same list).
    assert set(copied_sources(name)) >= {"setup.cfg", "pyproject.toml", "README.md", "dicom_node", "pipeline",
                                         "config", "models", "deploy/install.sh", "deploy/container.yaml"}
    user = [args for k, args in steps if k == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), f"USER must be a numeric non-root uid:gid, got {user}"
    health = " ".join(args for k, args in steps if k == "HEALTHCHECK")
    assert '"dicom-node", "echo", "127.0.0.1", "11112", "ILD_NODE", "--config", "/config/node.yaml"' in health
    assert "11112" in dict(steps)["EXPOSE"] and "8080" in dict(steps)["EXPOSE"]
    volumes = dict(steps)["VOLUME"]
    assert all(v in volumes for v in ("/data/storage", "/data/db", "/config"))
    assert dict(steps)["CMD"] == '["dicom-node", "serve", "--config", "/config/node.yaml"]'
    # The dockerignore file (BuildKit reads <Dockerfile>.dockerignore) lets the copied sources in.
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:] and all(f"!{s}" in ignore or f"!{s}/" in ignore for s in copied_sources(name))


def copied_sources(name: str) -> list[str]:
    """Repository paths the build stage COPYs from the context (not --from another stage)."""
    out = []
    for kind, args in instructions(DEPLOY / name):
        if kind == "COPY" and not args.startswith("--from"):
            out += [p.rstrip("/") for p in args.split()[:-1]]
    return out


def test_container_configs_load_and_agree() -> None:
    """The image's own config, the compose one and the systemd one validate; compose = image + Orthanc."""
    container = load_config(DEPLOY / "container.yaml")
    compose = load_config(DEPLOY / "compose-node.yaml")
    systemd = load_config(DEPLOY / "systemd" / "node.yaml")
    for cfg in (container, compose, systemd):  # the installed package's bundled model and shipped rules
        assert cfg.model.path == PROJECT_ROOT / "models" / "ild-demo.safetensors"
        assert cfg.rules == DEFAULT_RULES
    for cfg in (container, compose):
        assert cfg.storage.root == Path("/data/storage") and cfg.database.url == "sqlite:////data/db/node.db"
        assert cfg.web.host == "0.0.0.0" and (cfg.node.port, cfg.web.port) == (11112, 8080)  # as EXPOSEd
    assert systemd.storage.root == Path("/var/lib/ild-node/storage")  # the unit's only ReadWritePaths
    assert systemd.database.url == "sqlite:////var/lib/ild-node/node.db"
    # The image's health check calls the node with its own AE title: the compose config must allow it.
    assert any(c.ae_title == compose.node.ae_title and c.host == "127.0.0.1" for c in compose.node.allowed_callers)


def test_compose_wires_the_node_and_orthanc_as_deploy_orthanc_expects() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    orthanc, node = compose["services"]["orthanc"], compose["services"]["ild-node"]
    assert orthanc["build"]["dockerfile"] == "deploy/Dockerfile.orthanc"
    assert node["build"]["dockerfile"] == "deploy/Dockerfile"
    # One network namespace: each reaches the other on 127.0.0.1, as orthanc.json and compose-node.yaml say.
    assert node["network_mode"] == "service:orthanc"
    mounts = {m.split(":")[1]: (DEPLOY / m.split(":")[0]).resolve() for m in orthanc["volumes"] if m.startswith("./")}
    assert mounts["/etc/orthanc/orthanc.json"] == (DEPLOY / "orthanc" / "orthanc.json").resolve()
    assert mounts["/etc/orthanc/route-to-ild-node.lua"] == (DEPLOY / "orthanc" / "route-to-ild-node.lua").resolve()
    assert all(p.is_file() for p in mounts.values())
    node_mounts = {m.split(":")[1]: DEPLOY / m.split(":")[0] for m in node["volumes"] if m.startswith("./")}
    assert node_mounts["/config/node.yaml"] == DEPLOY / "./compose-node.yaml"

    site = load_orthanc_config()
    cfg = load_config(DEPLOY / "compose-node.yaml")
    modality = site["DicomModalities"][site["IldNode"]["Modality"]]
    assert (modality["AET"], modality["Host"], modality["Port"]) == (cfg.node.ae_title, "127.0.0.1", cfg.node.port)
    assert site["LuaScripts"] == ["/etc/orthanc/route-to-ild-node.lua"]
    (dest,) = cfg.destinations
    assert (dest.ae_title, dest.host, dest.port) == (site["DicomAet"], "127.0.0.1", site["DicomPort"])
    assert any(c.ae_title == site["DicomAet"] and c.host == "127.0.0.1" for c in cfg.node.allowed_callers)
    published = {p.rsplit(":", 1)[-1] for p in orthanc["ports"]}
    assert published == {"4242", "8042", "8080"}  # the node's DICOM port stays private: only Orthanc calls it
    assert "ORTHANC_PASSWORD" in orthanc["environment"] and ":?" in orthanc["environment"]["ORTHANC_PASSWORD"]


def test_orthanc_takes_the_compose_password_from_the_environment(tmp_path: Path) -> None:
    """The compose credentials file: Orthanc (the Debian 1.10 build the image installs) expands ${ORTHANC_PASSWORD}."""
    assert ORTHANC, "Orthanc is not installed (Debian package orthanc; `make debian-tools`)"
    import httpx

    http = free_port()
    (tmp_path / "a.json").write_text(
        f'{{"HttpPort": {http}, "DicomPort": {free_port()}, "StorageDirectory": "{tmp_path}/db", '
        f'"IndexDirectory": "{tmp_path}/db", "AuthenticationEnabled": true, "RemoteAccessAllowed": false}}')
    shutil.copy(DEPLOY / "orthanc-credentials.json", tmp_path / "credentials.json")
    password = "compose-test-" + os.urandom(8).hex()
    log = (tmp_path / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(tmp_path)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "ORTHANC_PASSWORD": password})
    try:
        url = f"http://127.0.0.1:{http}/system"

        def status(auth: tuple[str, str]) -> int | None:
            try:
                return httpx.get(url, auth=auth, timeout=2).status_code
            except httpx.TransportError:
                return None

        assert wait_for(lambda: status(("pacs-admin", password)), 20, "Orthanc's REST API") == 200
        assert status(("pacs-admin", "${ORTHANC_PASSWORD}")) == 401
        assert status(("pacs-admin", "wrong")) == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


# ------------------------------------------------------------------------------------------ systemd


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    unit = (DEPLOY / "systemd" / "dicom-node.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "true", "PrivateTmp": "true",
                       "ReadWritePaths": "/var/lib/ild-node", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                       "User": "ild-node", "RestartPreventExitStatus": "2", "CapabilityBoundingSet": ""}.items():
        assert settings.get(key) == value, (key, settings.get(key))
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    exe = "/opt/ild-node/.venv/bin/dicom-node"
    assert settings["ExecStart"].startswith(exe + " serve --config /etc/ild-node/node.yaml")
    local = tmp_path / "dicom-node.service"
    local.write_text(unit.replace(exe, str(VENV_BIN / "dicom-node")))
    r = run([analyze, "verify", str(local)], timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = run([analyze, "security", "--offline=true", str(local)], timeout=60)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout).group(1))  # type: ignore[union-attr]
    assert exposure <= 2.0, r.stdout  # systemd's scale: 0 (locked down) .. 10 (exposed); 1.7 when written


# ------------------------------------------------------------------------------------------ vendor examples

VENDOR_PRESETS = {
    "ge": {"named_flair", "ge_cube_flair", "long_ti_spin_echo", "ge_cube_t1", "generic_3d_fse_t1", "ge_bravo",
           "ir_prepped_3d_gre"},
    "siemens": {"named_flair", "siemens_spcir_tir", "long_ti_spin_echo", "siemens_space_t1", "generic_3d_fse_t1",
                "siemens_mprage", "ir_prepped_3d_gre", "siemens_vibe"},
    "philips": {"named_flair", "philips_vista_flair", "long_ti_spin_echo", "philips_vista_t1", "generic_3d_fse_t1",
                "philips_3d_t1_tfe", "ir_prepped_3d_gre", "philips_3d_t1_ffe"},
}
# The vendor's real series in ../shared/data/real-dicom and the decision MANIFEST.md / docs/rules.md give them
# (no contrast in the corpus, so no role). There is no Philips file in the corpus.
REAL_BY_VENDOR = {
    "ge": {"dcm_qa_deident/10_Accelerated_SAG_IR-SPGR": "t1_gre/ge_bravo",
           "dcm_qa_ge/05_3D_Ax_T1_MP_RAGE_R22": "t1_gre/ge_bravo",
           "dcm_qa_ge/01_Ax_DWI_TENSOR_R2": "exclusion:diffusion"},
    "siemens": {"dcm_qa_xa30i/6001_anat-T1w_acq-tfl": "t1_gre/siemens_mprage",
                "dcm_qa_xa30/6_anat-T1w_acq-tfl": "t1_gre/siemens_mprage",
                "dcm_qa_xa30i/1001_AAHead_Scout": "exclusion:localizer",
                "dcm_qa_xa30i/2001_AAHead_Scout": "exclusion:derived",
                "dcm_qa_xa30i/12001_DWI_dir80_AP": "exclusion:derived",
                "dcm_qa_xa30i/19001_Perfusion_Weighted_MR": "exclusion:derived",
                "dcm_qa_xa30i/19001_Perfusion_Weighted_SC": "exclusion:secondary_capture",
                "dcm_qa_xa30i/99_Phoenix_Document": "exclusion:non_image",
                "dcm_qa_ts/ax_asc_35sl": "exclusion:epi"},
    "philips": {},
}


def vendor_rules(vendor: str) -> tuple[NodeConfig, RuleSet]:
    cfg = load_config(EXAMPLES / f"{vendor}.yaml")
    return cfg, load_rules(cfg.rules)


@pytest.mark.parametrize("vendor", sorted(VENDOR_PRESETS))
def test_vendor_example_uses_the_shipped_rules_and_model(vendor: str) -> None:
    # One rules file for every vendor (no per-vendor copies to drift apart); the example documents the naming.
    cfg, _ = vendor_rules(vendor)
    assert cfg.rules == ROOT / "config" / "series_rules.yaml"
    assert cfg.model.path == ROOT / "models" / "ild-demo.safetensors" and cfg.model.path.is_file()
    text = (EXAMPLES / f"{vendor}.yaml").read_text()
    for preset in VENDOR_PRESETS[vendor] - {"named_flair", "long_ti_spin_echo", "generic_3d_fse_t1",
                                            "ir_prepped_3d_gre"}:
        assert preset in text, f"{vendor}.yaml does not name its preset {preset}"


@pytest.mark.parametrize("vendor", ["ge", "siemens"])
def test_vendor_example_classifies_the_vendors_real_series(vendor: str) -> None:
    if not (REAL / "MANIFEST.md").is_file():
        pytest.fail("../shared/data/real-dicom is missing (the real scanner files the tests use)")
    _, rules = vendor_rules(vendor)
    expected = REAL_BY_VENDOR[vendor]
    series = [f for f in scan_directory(REAL)
              if str(Path(f.source[0]).parent.relative_to(REAL)) in expected]
    decisions = {d.series_instance_uid: d for a in assign_studies(series, rules) for d in a.decisions}
    got = {str(Path(f.source[0]).parent.relative_to(REAL)): decisions[f.series_instance_uid] for f in series}
    assert set(got) == set(expected)
    for folder, matcher in expected.items():
        assert (got[folder].role, got[folder].matcher) == (None, matcher), (folder, got[folder].reason)


@pytest.mark.parametrize("vendor", sorted(VENDOR_PRESETS))
def test_vendor_example_finds_every_role_of_a_synthetic_study_of_that_vendor(vendor: str, tmp_path: Path) -> None:
    _, rules = vendor_rules(vendor)
    study = generate_study(21, vendor=Vendor(vendor), voxel_mm=3.0)
    write_dicom_study(study, tmp_path)
    uid_of = {study.series[p.index].kind: p.series_uid for p in plan_study(study).series}
    assignment = assign_roles(scan_directory(tmp_path), rules)
    assert {role: c.series_instance_uid for role, c in assignment.chosen.items()} == {
        kind.value: uid for kind, uid in uid_of.items() if kind.is_role}
    for role in assignment.chosen:
        assert assignment.decision_for(assignment.chosen[role].series_instance_uid).preset in VENDOR_PRESETS[vendor]


# ------------------------------------------------------------------------------------------ install.sh


@pytest.mark.slow
def test_install_script_installs_a_working_node_in_a_fresh_venv(tmp_path: Path) -> None:
    """deploy/install.sh, on exactly the files the Dockerfile COPYs, in a new venv; then the node starts.

    torch comes from pip's configured wheel sources (the local CPU wheel here) instead of the image's CPU index;
    everything else is what the image runs. 1-3 minutes with pip's cache (60 s idle, 156 s under load here)."""
    src = tmp_path / "src"
    for rel in copied_sources("Dockerfile"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / rel).is_dir() else shutil.copy2
        copy(ROOT / rel, src / rel, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": sys._base_executable, "TORCH_PIP_ARGS": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    t0 = time.monotonic()
    r = run(["sh", str(src / "deploy" / "install.sh"), str(venv), str(src)], env=env, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # quiet: no setuptools warnings (pip's notes on this machine's unused local indexes aside)
    said = [line for line in (r.stdout + r.stderr).splitlines() if "is ignored" not in line]
    assert not [line for line in said if "warning" in line.lower()], said[-40:]
    print(f"install.sh: {time.monotonic() - t0:.0f} s")
    # A wheel install: nothing of the checkout is needed any more.
    shutil.rmtree(src)
    node = venv / "bin" / "dicom-node"
    help_text = run([str(node), "--help"], timeout=120).stdout
    assert "serve" in help_text and "segment" in help_text
    # The installed node imports from its own site-packages, not from this checkout (cwd: not the checkout,
    # which `python -c` would put first on sys.path), and its metadata has the one version number.
    probe = ("import dicom_node, importlib.metadata as m; "
             "print(dicom_node.__file__, dicom_node.__version__, m.version('ild-dicom-node'))")
    where, version, metadata = run([str(venv / "bin" / "python"), "-c", probe], timeout=120, cwd=tmp_path).stdout.split()
    assert Path(where).is_relative_to(venv), where
    assert version == metadata == __version__
    # The container config, made local, resolves the model and rules to the package's own shipped files ...
    container = tmp_path / "site" / "node.yaml"
    cfg = yaml.safe_load((DEPLOY / "container.yaml").read_text())
    port, web = free_port(), free_port()
    cfg.update(storage={"root": str(tmp_path / "storage")}, database={"url": f"sqlite:///{tmp_path}/node.db"})
    cfg["node"].update(port=port, bind_address="127.0.0.1")
    cfg["web"].update(host="127.0.0.1", port=web)
    container.parent.mkdir()
    container.write_text(yaml.safe_dump(cfg))
    shown = yaml.safe_load(run([str(node), "config", "show", "--config", str(container)], timeout=120).stdout)
    site_packages = Path(where).parents[1]
    assert shown["model"]["path"] == str(site_packages / "models" / "ild-demo.safetensors")
    assert shown["rules"] == str(site_packages / "config" / "series_rules.yaml")
    # ... and serves: it starts, answers C-ECHO and stops on SIGTERM.
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([str(node), "serve", "--config", str(container)], stdout=log,
                             stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        def echo() -> bool:
            return run([str(node), "echo", "127.0.0.1", str(port), "ILD_NODE", "--config", str(container),
                        "--timeout", "5"], timeout=120).returncode == 0

        wait_for(echo, 120, "the freshly installed node to answer C-ECHO", interval=1)
    finally:
        serve.terminate()
        assert serve.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        log.close()
