import subprocess

from pydicom.data import get_testdata_file


def test_a_ct_image_becomes_an_imaging_study(imaging_scp):
    ct_file = get_testdata_file("CT_small.dcm")
    subprocess.run(
        ["storescu", "-aec", imaging_scp.aet, "127.0.0.1", str(imaging_scp.port), ct_file],
        check=True,
    )

    study = imaging_scp.wait_for_study("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322", timeout=10)

    assert study["numberOfInstances"] == 1
    assert study["series"][0]["modality"]["coding"][0]["code"] == "CT"
    assert study["subject"]["display"] == "CT1 CompressedSamples"
