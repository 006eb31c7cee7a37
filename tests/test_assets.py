"""Downloaded and installed weights are checked against pinned SHA-256 digests before they are used."""

from __future__ import annotations

import hashlib

import pytest

from sparsex_sgl.assets import SMOLLM2_GGUF, SMOLLM2_PACKAGE, SMOLLM2_SHA256, SPLIT_MODELS, _package_dir, check_sha256


def test_the_installed_smollm2_gguf_is_the_pinned_one_and_a_changed_byte_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    real = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    check_sha256(real, SMOLLM2_SHA256)
    data = bytearray(real.read_bytes()[: 1 << 20])
    copy = tmp_path / "part.gguf"
    copy.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()
    check_sha256(copy, digest)
    data[12345] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="SHA-256"):
        check_sha256(copy, digest)


def test_every_part_wheel_of_every_split_model_has_a_pin() -> None:
    for model in SPLIT_MODELS.values():
        wheels = {f"{name.replace('-', '_')}-{model.version}-py3-none-any.whl" for name in model.packages}
        assert wheels == set(model.wheel_sha256), model.folder
        assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in model.wheel_sha256.values())
