"""pytest plugin (entry point ``imagingstudy_scp``): the ``imaging_scp`` fixture.

    def test_modality_sends_a_study(imaging_scp, tmp_path):
        ...  # send to 127.0.0.1:imaging_scp.port, AE title imaging_scp.aet
        study = imaging_scp.wait_for_study(study_uid, timeout=10)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scp.api import StorageSCP


@pytest.fixture
def imaging_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageSCP]:
    """A running embedded Storage SCP on a free 127.0.0.1 port, with its own data dir; stopped afterwards."""
    data_dir: Path = tmp_path_factory.mktemp("imaging-scp")
    with StorageSCP(data_dir) as scp:
        yield scp
