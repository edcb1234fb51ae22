"""tests/shared is a faithful copy of the shared contract data it stands in for."""

from __future__ import annotations

import pytest

from tests.support import SHARED_BESIDE, SNAPSHOT


def _files(root):  # type: ignore[no-untyped-def]
    names = ["signature_vectors.json", *(f"samples/{p.name}" for p in
                                         sorted((root / "samples").glob("*.json")))]
    return {name: (root / name).read_bytes() for name in names}


@pytest.mark.skipif(not (SHARED_BESIDE / "signature_vectors.json").exists(),
                    reason="no ../shared beside this clone to compare with")
def test_the_snapshot_in_tests_shared_equals_the_shared_data_beside_the_repository() -> None:
    assert _files(SNAPSHOT) == _files(SHARED_BESIDE)
