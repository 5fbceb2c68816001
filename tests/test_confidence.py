"""The calibrated keypoint confidence and the cached checksum record."""

import json
import os

import numpy as np
import pytest
from locllm_sdk.errors import ArgumentError, CheckpointError, EngineError
from locllm_sdk.filecache import verified_sha256, verify_mode
from locllm_sdk.loader import CONFIDENCE_FIELD, checkpoint_confidence
from locllm_sdk.manifest import ConfidenceCalibration, EngineManifest, sha256_file
from locllm_training.calibration import auroc, expected_calibration_error, fit_platt


def test_platt_fit_recovers_a_known_sigmoid():
    rng = np.random.default_rng(0)
    s = rng.uniform(0.4, 0.8, 20000)
    truth = 1 / (1 + np.exp(-(25.0 * s - 14.0)))
    y = (rng.random(s.size) < truth).astype(float)
    slope, intercept = fit_platt(s, y)
    assert abs(slope - 25.0) < 1.5 and abs(intercept + 14.0) < 1.0
    cal = ConfidenceCalibration(slope, intercept)
    # calibrated: the confidence matches the observed frequency; the raw score does not
    assert expected_calibration_error(cal(s), y) < 0.02
    assert expected_calibration_error(s, y) > 0.05
    with pytest.raises(ValueError, match="both correct and wrong"):
        fit_platt([0.5, 0.6], [1, 1])


def test_auroc_counts_ties_half():
    assert auroc(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    assert auroc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0


def test_calibration_in_manifest_and_config_round_trips(trained):
    _, engine = trained[2]
    m = EngineManifest.read(engine)
    cal = ConfidenceCalibration(20.0, -11.0, fitted_on="x.json (3 images)")
    doc = m.replace(confidence=cal).to_dict()
    assert EngineManifest.from_dict(json.loads(json.dumps(doc))).confidence == cal
    doc["confidence"] = {"slope": "steep", "intercept": 0}
    with pytest.raises(EngineError, match="'confidence.slope' must be a number"):
        EngineManifest.from_dict(doc)
    assert checkpoint_confidence({}) is None
    assert checkpoint_confidence({CONFIDENCE_FIELD: cal.to_dict()}) == cal
    with pytest.raises(CheckpointError, match="'confidence.method' must be 'platt'"):
        checkpoint_confidence({CONFIDENCE_FIELD: cal.to_dict() | {"method": "isotonic"}})


def test_pose_reports_confidence_from_the_manifest(trained, tmp_path):
    import shutil

    from locllm_sdk import Pose

    _, engine = trained[2]
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    m = EngineManifest.read(copy)
    plain = Pose(copy).locate(np.full((64, 48, 3), 128, np.uint8), ["neck", "left wrist"])
    assert plain.confidence is None and plain[0]["neck"].confidence is None
    cal = ConfidenceCalibration(30.0, -15.0)
    m.replace(confidence=cal).write(copy)
    res = Pose(copy).locate(np.full((64, 48, 3), 128, np.uint8), ["neck", "left wrist"])
    want = 1 / (1 + np.exp(-(30.0 * res.conf - 15.0)))
    np.testing.assert_allclose(res.confidence, want, rtol=1e-12)
    assert res[0]["neck"].to_dict()["confidence"] == pytest.approx(float(want[0, 0]))
    # plot's threshold reads the confidence: a threshold above every confidence draws no keypoint
    top = float(res.confidence.max())
    drawn = res.plot(kpt_thr=top + 1e-9, labels=False)
    kept = res.plot(kpt_thr=0.0, labels=False)
    assert not np.array_equal(drawn, kept)


def test_checksum_record_skips_rehashing_an_unchanged_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCLLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(4096))
    digest = sha256_file(f)
    calls = []
    import locllm_sdk.filecache as fc

    real = fc.sha256_file
    monkeypatch.setattr(fc, "sha256_file", lambda p: calls.append(p) or real(p))
    assert verified_sha256(f) == digest and len(calls) == 1
    assert verified_sha256(f) == digest and len(calls) == 1  # read from the record
    assert verified_sha256(f, "always") == digest and len(calls) == 2
    # a rewrite (same size, new content, new mtime) is hashed again and gives the new digest
    f.write_bytes(os.urandom(4096))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert verified_sha256(f) == sha256_file(f) != digest and len(calls) == 3
    # a damaged record is ignored, not trusted
    (tmp_path / "cache" / "verified-files.json").write_text("{not json")
    assert verified_sha256(f) == sha256_file(f) and len(calls) == 4


def test_verify_modes():
    assert verify_mode(True) == "always" and verify_mode(False) == "sizes" and verify_mode("cached") == "cached"
    with pytest.raises(ArgumentError, match="verify must be"):
        verify_mode("sometimes")


def test_engine_load_detects_a_modified_file_despite_the_record(trained, tmp_path, monkeypatch):
    import shutil

    from locllm_sdk import Pose

    monkeypatch.setenv("LOCLLM_CACHE", str(tmp_path / "cache"))
    _, engine = trained[2]
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    Pose(copy)  # records every file
    emb = copy / "embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0xFF
    emb.write_bytes(bytes(data))
    st = emb.stat()
    os.utime(emb, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(EngineError, match="sha256 differs"):
        Pose(copy)
    with pytest.raises(ArgumentError, match="verify must be"):
        Pose(copy, verify="never")
