"""CheckpointSoup against its equations on real fits: the soups are the means of the recorded
epoch-end weights, the greedy soup is never worse than its best snapshot on the validation loss;
TensorBoard tags read back; refused without validation data."""

import pytest
import torch
from harness import read_scalars
from soup_helpers import EpochEnds, fit

from litplug.callbacks import CheckpointSoup


def mean(states):
    return {k: sum(s[k] for s in states) / len(states) for k in states[0] if states[0][k].is_floating_point()}


@pytest.mark.parametrize("final", ["uniform", "greedy"])
def test_checkpoint_soup_equals_the_mean_of_the_latest_epoch_ends(tmp_path, final):
    rec, soup = EpochEnds(), CheckpointSoup(k=3, final_weights=final)
    model, _ = fit(tmp_path, [rec, soup])
    assert soup.epochs == [1, 2, 3] and len(soup.snapshots) == 3
    members = [rec.states[1 + i] for i in (range(3) if final == "uniform" else soup.greedy_members)]
    for name, value in mean(members).items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-12, atol=1e-12)
    scalars = read_scalars(tmp_path)
    assert [v for _, v in scalars["soup/snapshot_loss"]] == pytest.approx(soup.snapshot_losses)
    assert soup.losses["greedy"] <= min(soup.snapshot_losses)  # never worse than its best ingredient
    for name in ("uniform", "greedy", "live"):
        assert scalars[f"soup/{name}_loss"][0][1] == pytest.approx(soup.losses[name])


def test_refused_without_validation_data(tmp_path):
    with pytest.raises(ValueError, match="CheckpointSoup chooses its merge on validation data"):
        fit(tmp_path, [CheckpointSoup()], epochs=1, limit_val_batches=0)
