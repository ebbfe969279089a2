"""Issue 5: 8 concurrent associations × 250 instances, several writing into the same study.

* associations 0-3 send study A (1,000 instances in 4 series), interleaved: each takes every fourth
  instance, so all four write into every series of A at once;
* associations 4-5 send the two halves of study B (500 instances, 2 series);
* association 6 sends study C (250 instances), and association 7 sends study D (200 instances) plus
  50 instances of C that association 6 sends too, at about the same moment.

Every instance must be stored exactly once (2,000 sent, 1,950 distinct), indexed once, and every
published ImagingStudy must count its series and instances exactly.

The senders are eight DCMTK ``storescu`` processes: pynetdicom SCUs sharing one process lose a
response now and then under this load (a race between ``send_c_store`` and the requestor's own
reactor thread, pynetdicom issues #842/#850), which would be a test artefact, not a server fault.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom

from conftest import AET, RunningSCP, dcmtk
from dicom_factory import make_study

ASSOCIATIONS = 8
PER_ASSOCIATION = 250


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu(port: int, number: int, files: list[Path]) -> subprocess.Popen[str]:
    """One association sending ``files`` in order; ``-v`` prints each response."""
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aec", AET, "-aet", f"LOAD{number}", "-xe", "-to", "60", "-ta", "60",
         "-td", "60", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"},
    )


def responses(output: str) -> list[str]:
    """The file of each request and its response, in order, from storescu -v output."""
    sent = re.findall(r"^I: Sending file: (.+)$|^I: Received Store Response \((.+)\)$|^E: Store Failed, file: (.+):$",
                      output, re.MULTILINE)
    result, current = [], None
    for file, status, failed in sent:
        if file:
            current = file
        elif status:
            result.append(f"{current}: {status}")
        else:
            result.append(f"{failed}: FAILED")
    return result


def test_eight_concurrent_associations_store_every_instance_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    a = make_study(src / "a", series=(("CT", 250), ("CT", 250), ("MR", 250), ("MR", 250)), seed="load-a")
    b = make_study(src / "b", series=(("CT", 250), ("CT", 250)), seed="load-b")
    c = make_study(src / "c", series=(("MR", 125), ("MR", 125)), seed="load-c")
    d = make_study(src / "d", series=(("CT", 200),), seed="load-d")
    plans = [a.files[i::4] for i in range(4)] + [b.files[:250], b.files[250:]] + [c.files]
    shared = c.files[::5]  # 50 instances of C, sent by association 6 and by association 7
    plans.append([f for group in zip(d.files[::4], d.files[1::4], d.files[2::4], d.files[3::4], shared)
                  for f in group])
    assert [len(p) for p in plans] == [PER_ASSOCIATION] * ASSOCIATIONS
    expected = {study.study_uid: {sop_uid(p): p for p in study.files} for study in (a, b, c, d)}
    distinct = {uid for members in expected.values() for uid in members}

    server = RunningSCP(tmp_path / "data").start()
    try:
        began = time.monotonic()
        senders = [storescu(server.port, n, plan) for n, plan in enumerate(plans)]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        sent_in = time.monotonic() - began
        for n, (sender, output) in enumerate(zip(senders, outputs)):
            answered = responses(output)
            assert sender.returncode == 0, f"storescu {n} exited {sender.returncode}:\n{output[-2000:]}"
            assert len(answered) == PER_ASSOCIATION and all(r.endswith(": Success") for r in answered), (
                f"association {n}: {[r for r in answered if not r.endswith(': Success')][:5]} "
                f"({len(answered)} responses)\n{output[-1500:]}")

        published_at = time.monotonic()
        resources = {study: server.wait_for_study(study, instances=len(members), timeout=60)
                     for study, members in expected.items()}
        publish_wait = time.monotonic() - published_at

        files = [Path(root, name) for root, _, names in os.walk(server.data_dir / "studies") for name in names]
        assert len(files) == len(distinct) == 1950
        assert {p.name.removesuffix(".dcm") for p in files} == distinct
        db = sqlite3.connect(f"file:{server.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT sop_uid, count(*) FROM instances GROUP BY sop_uid").fetchall()
        finally:
            db.close()
        assert len(rows) == 1950 and all(count == 1 for _, count in rows)

        for study, members in expected.items():
            resource = resources[study]
            series_of = {uid: str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                         for uid, p in members.items()}
            assert resource["numberOfInstances"] == len(members)
            assert resource["numberOfSeries"] == len(set(series_of.values()))
            for series in resource["series"]:
                instances = [i["uid"] for i in series["instance"]]
                assert len(instances) == len(set(instances)) == series["numberOfInstances"]
                assert {uid for uid, s in series_of.items() if s == series["uid"]} == set(instances)
    finally:
        server.stop()
    print(f"\nload: {ASSOCIATIONS}x{PER_ASSOCIATION} instances over {ASSOCIATIONS} concurrent storescu associations "
          f"in {sent_in:.1f}s ({ASSOCIATIONS * PER_ASSOCIATION / sent_in:.0f} instances/s); all 4 studies published "
          f"{publish_wait:.2f}s after the last response")
