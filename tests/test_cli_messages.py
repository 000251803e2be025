"""The training scripts' command line: help for every flag, one-line errors that point the right way.

Each case runs the real `trainer.main` of a script in this process (no subprocess: the messages
come before any training) and reads what it prints.
"""
import os

import pytest

import train_x3d_charades
import train_x3d_charades_loc
import train_x3d_kinetics_multigrid as kinetics
import trainer

SCRIPTS = (kinetics, train_x3d_charades, train_x3d_charades_loc)


def fails(capsys, script, argv):
    """Run the script's main on argv; it must exit 2 with one line on stderr: return that line."""
    with pytest.raises(SystemExit) as stop:
        trainer.main(script.TASK, script.CONSTANTS, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_every_flag_has_a_description(script):
    """Every constant of every script has a comment, which --help shows for its flag."""
    comments = trainer._constant_comments(script.__file__)
    parser = trainer.build_parser(script.CONSTANTS, comments=comments)
    bare = [a.option_strings[0] for a in parser._actions
            if a.option_strings[0] != "-h" and a.help.startswith("(default")]
    assert not bare, f"{script.__name__}: flags without a description: {bare}"


def test_a_mistyped_flag_gets_one_line_with_a_suggestion(capsys):
    """argparse's 54-line usage is replaced by the error and the closest flag."""
    line = fails(capsys, kinetics, ["--trian-root", "x"])
    assert "unknown flag --trian-root: did you mean --train-root?" in line
    assert "did you mean --x3d-version?" in fails(capsys, kinetics, ["--x3d", "XS"])
    assert "invalid int value: 'abc'" in fails(capsys, kinetics, ["--frames", "abc"])


def test_paths_are_checked_in_flag_order_naming_the_given_flag(capsys, tmp_path):
    """A missing --train-root is reported as such (not the default validation folder), only real
    flags are suggested, and a missing default says it is the default."""
    log = ["--log-dir", str(tmp_path / "logs")]
    missing = str(tmp_path / "nonexistent")
    line = fails(capsys, kinetics, ["--train-root", missing] + log)
    assert line.startswith(f"error: --train-root {missing} does not exist: give --train-root PATH")
    assert "--test-root" not in line
    train_root, listing = tmp_path / "train", tmp_path / "train.csv"
    train_root.mkdir()
    listing.write_text("")
    line = fails(capsys, kinetics, ["--train-root", str(train_root), "--train-annotations",
                                    str(listing), "--val-root", missing] + log)
    assert line.startswith(f"error: --val-root {missing} does not exist")
    if not os.path.exists(kinetics.TRAIN_ROOT):
        line = fails(capsys, kinetics, log)
        assert f"--train-root {kinetics.TRAIN_ROOT} (the default, TRAIN_ROOT" in line
    line = fails(capsys, train_x3d_charades, ["--frames-root", missing] + log)
    assert line.startswith(f"error: --frames-root {missing} does not exist")


@pytest.mark.parametrize("script,flag", [(kinetics, "--train-root"),
                                         (train_x3d_charades, "--test-annotations")],
                         ids=["kinetics", "charades"])
def test_demo_refuses_dataset_flags_it_would_replace(capsys, tmp_path, script, flag):
    """--demo with a dataset flag stops before writing anything, naming the flag."""
    line = fails(capsys, script, ["--demo", flag, str(tmp_path), "--log-dir", str(tmp_path)])
    assert f"would ignore {flag}: leave it out, or leave out --demo" in line
    assert os.listdir(tmp_path) == []


def test_eval_and_predict_need_an_existing_checkpoint(capsys, tmp_path):
    """--eval-only / --predict without --checkpoint, or with a missing file, say so in one line."""
    assert "--eval-only needs --checkpoint PATH" in fails(capsys, kinetics, ["--eval-only"])
    assert "--predict v.mp4 needs --checkpoint PATH" in fails(capsys, kinetics,
                                                               ["--predict", "v.mp4"])
    gone = str(tmp_path / "final.pt")
    assert f"--checkpoint {gone}: no such file" in fails(
        capsys, kinetics, ["--eval-only", "--checkpoint", gone])
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    assert f"cannot read checkpoint {garbage}" in fails(
        capsys, kinetics, ["--predict", "v.mp4", "--checkpoint", str(garbage)])
