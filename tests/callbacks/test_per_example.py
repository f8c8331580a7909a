"""The per-example base of ELR and PS-KD (litplug.callbacks.per_example): bad set-ups fail before
training with errors that say what to do."""

import pytest
from foreign import features
from harness import fast_trainer

from litplug.callbacks import ELR, PSKD
from litplug.datamodules import Indexed
from litplug.modules import MLP, Classifier


def test_bad_setups_fail_before_training(tmp_path):
    model = Classifier(MLP(input_shape=[6], num_outputs=3), 3)
    for callback in (ELR(), PSKD()):
        with pytest.raises(TypeError, match="Wrap it: `litplug.datamodules.Indexed"):
            fast_trainer(tmp_path, callbacks=[callback]).fit(model, features())
        wrong = Classifier(MLP(input_shape=[5], num_outputs=3), 3)
        with pytest.raises(ValueError, match=f"{type(callback).__name__} needs a classifier-like module"):
            fast_trainer(tmp_path, callbacks=[callback]).fit(wrong, Indexed(features()))
        assert wrong.global_step == 0
