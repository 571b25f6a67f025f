"""`finetune sample`'s refusals: files it does not load, options it cannot use, sizes past the machine."""

import pytest

from finetune.cli.main import main


def test_sample_refuses_pickle_files(tmp_path, capsys, tiny_model):
    (tmp_path / "lora.bin").write_bytes(b"not safe")
    code = main(["sample", "--base", str(tiny_model), "--lora", str(tmp_path / "lora.bin"), "--prompt", "x"])
    assert code == 2
    assert "pickle checkpoints are not loaded" in capsys.readouterr().err


def test_sample_refuses_zero_images_or_steps_a_file_as_out_and_a_second_condition(capsys, tiny_model, tmp_path):
    for option in ("--steps", "--num-images"):
        with pytest.raises(SystemExit):
            main(["sample", "--base", str(tiny_model), "--prompt", "a", option, "0"])
        assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err
    for out in ("file.txt", "file.txt/images"):  # a traceback after the images were made
        (tmp_path / "file.txt").write_text("kept")
        assert main(["sample", "--base", str(tiny_model), "--prompt", "a", "--out", str(tmp_path / out)]) == 2
        assert f"error: --out {tmp_path / out}: {tmp_path / 'file.txt'} is a file, not a folder" in capsys.readouterr().err
    two = ["--condition", "a.png", "--condition", "b.png"]
    assert main(["sample", "--base", str(tiny_model), "--controlnet", "c", *two, "--prompt", "a", "--prompt", "b"]) == 2
    assert "--condition takes one image, used for every prompt" in capsys.readouterr().err


def test_sample_at_a_size_that_runs_out_of_memory_is_one_line(capsys, tiny_model, tmp_path, monkeypatch):
    import finetune.sampling.inference

    def out_of_memory(*args, **kwargs):  # what the CPU's allocator raises at a size past its memory (4096, the largest taken, on a small machine)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes")

    monkeypatch.setattr(finetune.sampling.inference, "generate_with_settings", out_of_memory)
    assert main(["sample", "--base", str(tiny_model), "--prompt", "a", "--resolution", "4096", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip().endswith("error: out of memory sampling 4096x4096 px images: lower --resolution (this model's own is 64)")
    with pytest.raises(SystemExit):  # 0 was the model's own size, and -64 a traceback
        main(["sample", "--base", str(tiny_model), "--prompt", "a", "--resolution", "-64"])
    assert "argument --resolution: must be at least 1, got -64" in capsys.readouterr().err


def test_sample_shows_the_denoising_steps_as_it_goes(capsys, tiny_model, tmp_path):
    """Nothing was said between the device line and the files written: minutes for SD1.5 images on a CPU."""
    assert main(["sample", "--base", str(tiny_model), "--prompt", "a", "--steps", "3", "--num-images", "2", "--out", str(tmp_path / "s")]) == 0
    out, err = capsys.readouterr()
    assert "sampling:" in err and "/6 [" in err  # the bar of 3 steps of 2 images (cleared at its end)
    assert out.splitlines()[-1].startswith("wrote 2 images and a grid:")  # the bar, cleared, leaves the lines as they were
