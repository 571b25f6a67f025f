"""The model card a full run's checkpoint holds beside its pipeline (checkpoint.save_outputs) names where it is."""

from finetune.training.trainer import train


def test_a_checkpoints_pipeline_card_names_the_checkpoint_not_the_folder_it_was_written_in(make_recipe):
    """It was written while the checkpoint was still .partial-checkpoint-N: its title, its from_pretrained path and its
    `finetune sample --base` named that folder, which the finished checkpoint no longer has."""
    run = train(make_recipe(method="full", train__max_steps=2, checkpoint__every_n_steps=1)).output_dir
    card = (run / "checkpoints" / "checkpoint-1" / "pipeline" / "README.md").read_text()
    assert card.startswith(f"# {run.name}/checkpoints/checkpoint-1 (full)\n") and ".partial" not in card
    assert f'from_pretrained("{run / "checkpoints" / "checkpoint-1" / "pipeline"}"' in card
    assert f"finetune sample --base {run / 'checkpoints' / 'checkpoint-1' / 'pipeline'} " in card
    assert (run / "pipeline" / "README.md").read_text().startswith(f"# {run.name} (full)\n")  # the run's own, as before
