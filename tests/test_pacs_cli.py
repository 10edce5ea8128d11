"""``covidscan predict --dicomweb``: misuse is one line and exit 2, before any model or network access."""

from __future__ import annotations

import pytest

from covidscan.cli import main


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dicomweb", "http://pacs/dicom-web"], "--dicomweb needs --study"),
        (["--input", "x.png", "--dicomweb", "http://pacs/dicom-web", "--study", "1.2"], "either --input"),
        (["--input", "x.png", "--store-results"], "apply to --dicomweb"),
        (["--dicomweb", "http://pacs/dicom-web", "--study", "1.2", "--per-slice", "s.csv"], "do not apply"),
    ],
)
def test_dicomweb_misuse_is_a_one_line_error(arguments, message, capsys):
    assert main(["predict", "--checkpoint", "no-such-run", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
