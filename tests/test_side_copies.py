"""Side models held as separate Bagels (the sharded path) run the way the student runs."""

import copy

from hyperbagel.distillation.side_copies import SeparateCopy


def test_a_separate_copy_runs_in_the_students_mode_with_its_activation_checkpointing(tiny_bagel) -> None:
    fake_score = SeparateCopy(copy.deepcopy(tiny_bagel).eval(), trainable=True)
    student = tiny_bagel.train()
    student.language_model.model.gradient_checkpointing = True
    with fake_score.applied(student) as model:
        assert model is fake_score.bagel
        assert all(module.training for module in model.modules())
        assert model.language_model.model.gradient_checkpointing
    student.eval()  # Lightning's validation
    student.language_model.model.gradient_checkpointing = False
    with fake_score.applied(student) as model:
        assert not any(module.training for module in model.modules())
        assert not model.language_model.model.gradient_checkpointing
