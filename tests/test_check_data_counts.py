"""check-data's result line counts as every other message does (finetune/counts.py): it said
'1 fatal problem(s); fix them' and 'ready to train (1 warnings)'."""

from PIL import Image

from finetune.cli import main


def test_the_result_line_says_one_problem_or_warning_in_the_singular(tmp_path, capsys):
    for name in ("a", "b"):  # the same pixels twice: one warning
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("a red square")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "result: ready to train (1 warning)"

    (tmp_path / "c.png").write_bytes(b"not an image")
    (tmp_path / "c.txt").write_text("a red square")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("result: training would stop: 1 fatal problem; fix it, or set data.skip_bad_images")
    (tmp_path / "d.png").write_bytes(b"nor this")
    (tmp_path / "d.txt").write_text("a red square")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("result: training would stop: 2 fatal problems; fix them")
