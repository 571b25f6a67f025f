"""Where a folder's repeats are read from its sd-scripts `N_name` name (a suggested `folders:` entry), an N that is likely part
of the name (`2024_trip`: a year) is said with the rename that trains it once an epoch (finetune/data/folder_repeats.py). A recipe's
own `repeats:` is what its user chose: said in the check's uses per epoch by folder, with no note."""

from conftest import SHIPPED_BASE
from odd_images import captioned

from finetune.cli.main import main


def kohya_folders(root):
    for name in ("0.png", "1.png"):
        captioned(root / "2024_trip", name)
        captioned(root / "10_sks dog", name)
    return root


def test_make_conditions_suggestion_says_a_folder_whose_number_is_a_year(tmp_path, capsys):
    """make-conditions suggests the subfolders it wrote as data.folders entries, their repeats read from their names: the note
    check-data's suggestion has was left out of it."""
    out = tmp_path / "conditioned"
    assert main(["make-conditions", str(kohya_folders(tmp_path / "photos")), str(out), "--kind", "luminance"]) == 0
    *_, note, next_command = capsys.readouterr().out.splitlines()
    assert next_command.startswith("next: finetune train ")
    assert note == ("""note: train the subfolders as data.folders entries, in the recipe's data section: folders: [{path: "10_sks dog", repeats: 10}, """
                    """{path: "2024_trip", repeats: 2024}]; '2024_trip' reads as 2024 repeats (sd-scripts' N_name: each of its images 2024 times an """
                    "epoch, 99.5% of the epoch): if 2024 is part of its name, give it repeats 1 there (and for sd-scripts rename the folder '1_2024_trip')"), note  # fmt: skip


def test_make_conditions_suggestion_has_no_note_for_plausible_repeats(tmp_path, capsys):
    for name in ("0.png", "1.png"):
        captioned(tmp_path / "photos" / "10_sks dog", name)
        captioned(tmp_path / "photos" / "1_dog", name)
    assert main(["make-conditions", str(tmp_path / "photos"), str(tmp_path / "out"), "--kind", "luminance"]) == 0
    assert capsys.readouterr().out.splitlines()[-2].endswith('folders: [{path: "10_sks dog", repeats: 10}, {path: "1_dog", repeats: 1}]')


def test_a_recipes_own_repeats_are_its_users_choice_and_get_no_note(tmp_path, capsys):
    """`repeats: 2024` written in a recipe is read as written (data.folders never reads a count from a folder's name): the
    check says that folder's share of the epoch, which is what the user needs to see, and no rename."""
    root = kohya_folders(tmp_path / "train")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  image_dir: {root}\n  resolution: 64\n"
                      """  folders: [{path: "10_sks dog", repeats: 10}, {path: "2024_trip", repeats: 2024}]\n""")  # fmt: skip
    assert main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "uses per epoch by folder: '10_sks dog' 2 x10 = 20 (0%), '2024_trip' 2 x2024 = 4048 (100%)" in out, out
    assert "reads as 2024 repeats" not in out and "rename" not in out, out


def check_data_lines(tmp_path, capsys, recipe_text: str, *overrides: str) -> list[str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\n" + recipe_text)
    assert main(["check-data", str(recipe), *overrides]) == 0
    return capsys.readouterr().out.splitlines()


def test_an_n_name_folder_given_whole_says_its_n_is_no_repeats_here(tmp_path, capsys):
    """sd-scripts trains `10_sks dog` 10 times an epoch; as data.image_dir (or an instance_dir) it trained once an epoch here,
    unsaid, so an sd-scripts user's train.max_epochs=10 ran a tenth of the steps they counted on."""
    root = kohya_folders(tmp_path / "train")
    lines = check_data_lines(tmp_path, capsys, f"data: {{image_dir: '{root / '10_sks dog'}', resolution: 64}}\n")
    assert f"warning: data folder {root / '10_sks dog'} is named as sd-scripts' N_name folders are, which sd-scripts trains 10 times an epoch; " \
           "data.image_dir trains each of its images once an epoch: for sd-scripts' epochs set data.folders: [{path: ., repeats: 10}] " \
           "(or leave it, where 10 is part of its name)" in lines, lines  # fmt: skip
    concept = (f"method: dreambooth\noutput_dir: {tmp_path / 'out'}\ndata: {{resolution: 64}}\ndreambooth:\n  prior_preservation: false\n"
               f"  concepts: [{{instance_dir: '{root / '10_sks dog'}', instance_prompt: a photo of sks dog}}]\n")  # fmt: skip
    lines = check_data_lines(tmp_path, capsys, concept)
    assert any(line.endswith("dreambooth.concepts.0.instance_dir trains each of its images once an epoch: for sd-scripts' epochs set "
                             "dreambooth.concepts.0.repeats=10 (or leave it, where 10 is part of its name)") for line in lines), lines  # fmt: skip


def test_an_n_name_folder_with_its_repeats_set_or_a_year_gets_no_warning(tmp_path, capsys):
    root = kohya_folders(tmp_path / "train")
    for text in (f"data: {{image_dir: '{root / '10_sks dog'}', resolution: 64, folders: [{{path: ., repeats: 10}}]}}\n",
                 f"data: {{image_dir: '{root / '2024_trip'}', resolution: 64}}\n"):
        lines = check_data_lines(tmp_path, capsys, text)
        assert not any("N_name" in line for line in lines), lines
    concept = (f"method: dreambooth\noutput_dir: {tmp_path / 'out'}\ndata: {{resolution: 64}}\ndreambooth:\n  prior_preservation: false\n"
               f"  concepts: [{{instance_dir: '{root / '10_sks dog'}', instance_prompt: a photo of sks dog, repeats: 10}}]\n")  # fmt: skip
    assert not any("N_name" in line for line in check_data_lines(tmp_path, capsys, concept))
