"""The training state is typed and versioned: checkpoints carry it, resume refuses another
version, and states written before versions existed still resume."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import make_config, quiet

from tunelab.errors import RunError
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.loop import train
from tunelab.train.state import SCHEMA_VERSION, TrainState


def test_state_round_trips_and_reads_unversioned_states():
    state = TrainState(step=3, micro_batch=6, train_tokens=900, train_s=2.0, last_loss=0.5,
                       val_loss_before=1.5, samples_before=["a"], plan={"fits": True})
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict())), "x") == state
    assert state.tokens_per_second == 450
    unversioned = {key: value for key, value in state.to_dict().items()
                   if key != "schema_version"}
    assert TrainState.from_dict(unversioned, "x") == state


@pytest.mark.parametrize(("change", "message"), [
    ({"schema_version": SCHEMA_VERSION + 1}, "schema version"),
    ({"cursor": 4}, "unknown fields: cursor")])
def test_a_state_of_another_shape_is_refused(change, message):
    with pytest.raises(RunError, match=message) as caught:
        TrainState.from_dict({**TrainState().to_dict(), **change}, "run/checkpoints/step-4")
    assert "run/checkpoints/step-4" in caught.value.render()


def test_checkpoints_carry_the_versioned_state_and_resume_checks_it(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=3, samples=0)
    stopped = train(config, stop_after_steps=2, console=quiet())
    checkpoint = list_checkpoints(stopped.run_dir / "checkpoints")[-1]
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION and saved["step"] == 2
    assert TrainState.from_dict(saved, str(checkpoint)).micro_batch == 2
    saved["schema_version"] = SCHEMA_VERSION + 1
    (checkpoint / "trainer_state.json").write_text(json.dumps(saved))
    # a checkpoint written by another tunelab version: intact, with its own checksums
    (checkpoint / "files.sha256").write_text("".join(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
        for path in sorted(checkpoint.iterdir()) if path.name != "files.sha256"))
    with pytest.raises(RunError, match="schema version"):
        train(config, resume=stopped.run_dir, console=quiet())
