"""docs/conformance.md against the code: the tables marked ``<!-- checked: NAME -->`` are parsed and compared with
a real receiver's association negotiation (pynetdicom as the peer) and with the SEG, SR and Secondary Capture of a
real ``dicom-node segment --secondary-capture`` run (3 mm synthetic study, the known-function model of
test_pipeline_study)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_harness import free_port
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
)
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
)
from support.known_model import known_checkpoint
from support.studies import lesion_study, write_study
from typer.testing import CliRunner

from dicom_node import __version__, receiver
from dicom_node.cli import app
from dicom_node.config import NodeConfig
from dicom_node.scu import MAX_CONTEXTS, _plan_contexts, _read_header
from pipeline.dicom_out import common

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"


def checked_table(name: str) -> list[dict[str, str]]:
    """The rows of the markdown table that follows ``<!-- checked: name -->``, as header -> cell."""
    lines = STATEMENT.read_text().splitlines()
    start = lines.index(f"<!-- checked: {name} -->") + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]  # rows[1] is the |---| separator
    assert body, f"table {name} is empty"
    return [dict(zip(header, row, strict=True)) for row in body]


def column(name: str, key: str) -> list[str]:
    return [row[key] for row in checked_table(name)]


# ------------------------------------------------------------------------------------------ receiver (SCP)


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[receiver.Receiver]:
    root = tmp_path_factory.mktemp("scp")
    config = NodeConfig.model_validate({"node": {"port": free_port(), "bind_address": "127.0.0.1"},
                                        "storage": {"root": str(root), "min_free_gb": 0}})
    rx = receiver.Receiver(config, on_instance=lambda instance: None)
    rx.start()
    yield rx
    rx.stop()


def negotiate(rx: receiver.Receiver, contexts: list) -> tuple[set[tuple[str, str]], set[str], dict[str, str | int]]:
    """Associate with the receiver proposing ``contexts``: (accepted (abstract, transfer) pairs, rejected abstract
    syntaxes, what the acceptor said about itself)."""
    ae = AE(ae_title="CONFORMANCE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", rx.port, contexts=contexts, ae_title="ILD_NODE")
    assert assoc.is_established, "the receiver refused the association"
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        acceptor = {"max_pdu": assoc.acceptor.maximum_length,
                    "implementation_class_uid": str(assoc.acceptor.implementation_class_uid),
                    "implementation_version_name": str(assoc.acceptor.implementation_version_name)}
    finally:
        assoc.release()
    return accepted, rejected, acceptor


def test_statement_is_for_this_version() -> None:
    assert f"version **{__version__}**" in STATEMENT.read_text()


def test_scp_accepts_exactly_the_sop_classes_of_the_statement(scp: receiver.Receiver) -> None:
    stated = column("scp-sop-classes", "SOP class UID")
    assert len(stated) == len(set(stated))
    # Every stated class, proposed in as few associations as the 128-context limit allows, is accepted ...
    proposed = [*stated, VERIFICATION]
    accepted: set[str] = set()
    for i in range(0, len(proposed), MAX_CONTEXTS - 1):
        pairs, rejected, _ = negotiate(scp, [build_context(uid, "1.2.840.10008.1.2.1")
                                             for uid in proposed[i:i + MAX_CONTEXTS - 1]])
        assert not rejected, rejected
        accepted |= {abstract for abstract, _ in pairs}
    assert accepted == set(proposed)
    # ... the code's list is exactly that list, and services the statement says "No" to are refused.
    assert set(stated) == {cx.abstract_syntax for cx in AllStoragePresentationContexts}
    _, rejected, _ = negotiate(scp, [build_context(PatientRootQueryRetrieveInformationModelFind),
                                     build_context(ModalityWorklistInformationFind), build_context(VERIFICATION)])
    assert rejected == {PatientRootQueryRetrieveInformationModelFind, ModalityWorklistInformationFind}


def test_scp_transfer_syntaxes_are_those_of_the_statement(scp: receiver.Receiver) -> None:
    stated = column("scp-transfer-syntaxes", "UID")
    assert stated == receiver.transfer_syntaxes()  # same order: the node's preference
    # Each stated syntax alone, for an MR image (the class the model needs), is accepted; MPEG2 is not.
    mpeg2 = "1.2.840.10008.1.2.4.100"
    contexts = [build_context(receiver.MR_IMAGE_STORAGE, ts) for ts in [*stated, mpeg2]]
    pairs, _, _ = negotiate(scp, contexts)
    assert {ts for _, ts in pairs} == set(stated)


def test_routable_sop_classes_are_those_of_the_statement() -> None:
    assert set(column("routable-sop-classes", "SOP class UID")) == receiver.ROUTABLE_SOP_CLASSES


def test_association_parameters_are_those_of_the_statement(scp: receiver.Receiver) -> None:
    stated = {row["parameter"]: row["value"] for row in checked_table("association-parameters")}
    _, _, acceptor = negotiate(scp, [build_context(VERIFICATION)])
    assert int(stated["Maximum PDU size received (bytes)"]) == acceptor["max_pdu"] == receiver.MAX_PDU_SIZE
    defaults = NodeConfig()

    def number(key: str) -> float:
        return float(re.match(r"[\d.]+", stated[key]).group())  # type: ignore[union-attr]

    assert number("Maximum simultaneous associations accepted") == defaults.node.max_associations
    assert number("ACSE timeout (s)") == defaults.node.acse_timeout_seconds
    assert number("DIMSE timeout (s)") == defaults.node.dimse_timeout_seconds
    assert number("Network (idle) timeout (s)") == defaults.node.network_timeout_seconds
    assert number("Association, DIMSE and connection timeout when sending (s)") == defaults.send.timeout_seconds
    text = STATEMENT.read_text()
    assert acceptor["implementation_class_uid"] == PYNETDICOM_IMPLEMENTATION_UID
    assert f"Implementation Class UID `{PYNETDICOM_IMPLEMENTATION_UID}`" in text
    assert f"Implementation Version Name `{PYNETDICOM_IMPLEMENTATION_VERSION}`" in text


def test_scp_status_codes_are_those_of_the_receiver() -> None:
    stated = {int(code, 16) for code in column("scp-status-codes", "status")}
    assert stated == {receiver.STATUS_SUCCESS, receiver.STATUS_OUT_OF_RESOURCES, receiver.STATUS_DATASET_MISMATCH,
                      receiver.STATUS_CANNOT_PARSE, receiver.STATUS_INTERNAL_ERROR, receiver.STATUS_INVALID_UID}


# ------------------------------------------------------------------------------------------ outputs (SCU)


def segment_outputs(tmp: Path) -> tuple[Path, Path]:
    """``dicom-node segment --secondary-capture`` on a 3 mm synthetic study with planted lesions: (its DICOM
    folder, its results)."""
    write_study(lesion_study(0), tmp / "dicom")
    model = known_checkpoint(tmp / "known.safetensors", "t1_bravo_post")
    result = CliRunner().invoke(app, ["segment", str(tmp / "dicom"), "--out", str(tmp / "out"),
                                      "--model", str(model), "--threads", "2", "--secondary-capture"])
    assert result.exit_code == 0, result.output
    return tmp / "dicom", tmp / "out"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return segment_outputs(tmp_path_factory.mktemp("segment"))


@pytest.fixture(scope="module")
def outputs(run: tuple[Path, Path]) -> tuple[pydicom.Dataset, pydicom.Dataset, pydicom.Dataset]:
    """(SEG, SR, one source instance) of a real pipeline run."""
    source, out = run
    return (pydicom.dcmread(out / "seg.dcm"), pydicom.dcmread(out / "sr.dcm"),
            pydicom.dcmread(next(source.rglob("*.dcm")), stop_before_pixels=True))


@pytest.fixture(scope="module")
def sc(run: tuple[Path, Path]) -> pydicom.Dataset:
    """The run's first Secondary Capture key image (lesion 1)."""
    return pydicom.dcmread(run[1] / "sc-0002.dcm")


def test_scu_sop_classes_are_those_of_the_outputs(outputs, sc) -> None:
    seg, sr, _ = outputs
    stated = column("scu-sop-classes", "SOP class UID")
    assert set(stated) == {seg.SOPClassUID, sr.SOPClassUID, sc.SOPClassUID, VERIFICATION}


def test_scu_presentation_contexts_are_what_the_sender_proposes(outputs, sc, tmp_path: Path) -> None:
    seg, sr, _ = outputs
    files = [tmp_path / "seg.dcm", tmp_path / "sr.dcm", tmp_path / "sc.dcm"]
    seg.save_as(files[0], enforce_file_format=True)
    sr.save_as(files[1], enforce_file_format=True)
    sc.save_as(files[2], enforce_file_format=True)
    planned = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in _plan_contexts([_read_header(f) for f in files])}
    planned.add((VERIFICATION, tuple(build_context(VERIFICATION).transfer_syntax)))  # what `dicom-node echo` proposes
    stated = {(row["UID"], tuple(ts.strip() for ts in row["transfer syntaxes proposed"].split(",")))
              for row in checked_table("scu-presentation-contexts")}
    assert stated == planned


def test_output_facts_are_those_of_a_real_seg_sr_and_sc(outputs, sc) -> None:
    seg, sr, source = outputs
    facts = {row["attribute"]: (row["SEG"], row["SR"], row["SC"]) for row in checked_table("output-facts")}
    for i, ds in enumerate((seg, sr, sc)):
        assert ds.SOPClassUID == facts["SOP Class UID"][i]
        assert ds.file_meta.TransferSyntaxUID == facts["Transfer syntax written"][i]
        assert ds.Modality == facts["Modality"][i]
        assert str(ds.SeriesNumber) == facts["Series Number"][i]
        assert ds.Manufacturer == facts["Manufacturer"][i]
        assert facts["Specific Character Set"][i] == "as the source"
        assert ds.get("SpecificCharacterSet") == source.get("SpecificCharacterSet") is not None
        assert list(ds.SoftwareVersions) == ["0.0.1-test", f"dicom-node {__version__}"]
        assert ds.ManufacturerModelName == "ILD-known-function"
    template = sr.ContentTemplateSequence[0]
    assert facts["Content template (TID)"][1] == f"{template.TemplateIdentifier} ({template.MappingResource})"
    assert "ContentTemplateSequence" not in seg and facts["Content template (TID)"][0] == "-"
    assert "ContentTemplateSequence" not in sc and facts["Content template (TID)"][2] == "-"


def test_coded_terminology_is_the_code_table_of_the_writers(outputs) -> None:
    stated = {(row["code value"], row["coding scheme"], row["code meaning"]) for row in checked_table("codes")}
    used = [*common.CODES.values(), *common.ROLE_CODES.values(), *common.UNITS.values()]
    assert stated == {(c.value, c.scheme_designator, c.meaning) for c in used}
    # The local scheme the table uses is the one each SR declares.
    _, sr, _ = outputs
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == [common.PRIVATE_SCHEME]
