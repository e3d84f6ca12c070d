"""The one error boundary: the same mistake gets the same treatment in every command — one ``error:`` line on
stderr, exit 2, no traceback — and failed items, interruptions and DataLoader workers' errors their own status."""

import pytest
import torch

from braindino.cli import main
from braindino.cli.boundary import RunFailed, guarded
from braindino.errors import InputError

LABELS = ["--task", "classification", "--target", "dx"]
COMMANDS = {   # every command with an --out, with the least it needs besides --out / --manifest
    "synth": [],
    "manifest": ["--bids", "{manifest}"],
    "prepare": ["--manifest", "{manifest}"],
    "train": ["--config", "dino_vit_tiny_cpu", "--data", "{manifest}"],
    "export": ["--checkpoint", "{manifest}"],
    "extract": ["--model", "pixels", "--manifest", "{manifest}"],
    "probe": ["--model", "pixels", "--manifest", "{manifest}", *LABELS],
    "robustness": ["--model", "pixels", "--manifest", "{manifest}", *LABELS],
    "saliency": ["--model", "random:vit_tiny", "--manifest", "{manifest}"],
    "demo": [],
}
WITH_MANIFEST = [name for name, args in COMMANDS.items() if "--manifest" in args]
WITH_SLICE_STRIDE = ["extract", "probe", "robustness", "saliency", "demo"]


def one_error_line(capsys, argv) -> str:
    """Run ``braindino argv``: a bad option stops the parser (SystemExit, as argparse does), bad input the run."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, status, captured.err)
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def arguments(name: str, manifest, out) -> list[str]:
    return [name, *[a.format(manifest=manifest) for a in COMMANDS[name]], "--out", str(out)]


@pytest.fixture()
def manifest(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("path,subject,dx\nnowhere.nii.gz,s0,a\n")
    return path


@pytest.mark.parametrize("name", COMMANDS)
def test_unwritable_out_is_one_error_line(name, manifest, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_error_line(capsys, arguments(name, manifest, blocker / "out"))
    assert "--out" in line and "a_file" in line


@pytest.mark.parametrize("name", WITH_MANIFEST)
def test_missing_manifest_is_one_error_line(name, manifest, tmp_path, capsys):
    missing = tmp_path / "no_such_manifest.csv"
    assert str(missing) in one_error_line(capsys, arguments(name, missing, tmp_path / "out"))


@pytest.mark.parametrize("name", WITH_SLICE_STRIDE)
def test_zero_slice_stride_is_one_error_line(name, manifest, tmp_path, capsys):
    line = one_error_line(capsys, [*arguments(name, manifest, tmp_path / "out"), "--slice-stride", "0"])
    assert "--slice-stride" in line and "at least 1" in line


@pytest.mark.parametrize("name", ["probe", "robustness", "synth", "demo"])
def test_list_flags_are_comma_separated_everywhere(name, manifest, tmp_path, capsys):
    flag = {"probe": "--fractions", "robustness": "--seeds", "synth": "--sequences", "demo": "--seeds"}[name]
    assert flag in one_error_line(capsys, [*arguments(name, manifest, tmp_path / "out"), flag, "1,x"])


def raising(error):
    def run(_args):
        raise error
    return run


class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise InputError("/data/x.nii.gz", "not an image", "check the file")


def test_exit_statuses_of_the_boundary(capsys):
    assert guarded(raising(InputError("m.csv", "no such file", "check the path")), None) == 2
    assert capsys.readouterr().err == "error: m.csv: no such file — check the path\n"
    assert guarded(raising(PermissionError(13, "Permission denied", "/out")), None) == 2
    assert capsys.readouterr().err == "error: /out: Permission denied\n"
    assert guarded(raising(RunFailed(RuntimeError("loss is NaN\n  details"))), None) == 1
    assert capsys.readouterr().err == "error: loss is NaN\n"
    assert guarded(raising(KeyboardInterrupt()), None, "what is done is kept") == 130
    assert capsys.readouterr().err == "error: interrupted — what is done is kept\n"

    def through_a_worker(_args):
        return len(list(torch.utils.data.DataLoader(Broken(), batch_size=None, num_workers=1)))

    assert guarded(through_a_worker, None) == 1
    assert capsys.readouterr().err == "error: /data/x.nii.gz: not an image — check the file\n"
    with pytest.raises(ZeroDivisionError):    # a bug is not an input error: it still raises
        guarded(raising(ZeroDivisionError("division by zero")), None)
