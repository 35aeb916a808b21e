"""Multitask mixtures: the config's tasks are validated, and the drawn micro-batches realise the
configured token shares, reproducibly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data.mixture import mixing_rates, schedule_mixture, task_token_counts
from tunelab.errors import ConfigError

# Three tasks of different sizes and example lengths (tokens): a big task of mid-length
# examples, a small task of long ones and a tiny task of short ones.
SIZES = {"big": (600, 20, 40), "long": (120, 60, 100), "tiny": (40, 8, 12)}


def synthetic_tasks() -> tuple[list[int], list[str]]:
    rng = random.Random(0)
    lengths, tasks = [], []
    for name, (count, shortest, longest) in SIZES.items():
        lengths += [rng.randint(shortest, longest) for _ in range(count)]
        tasks += [name] * count
    return lengths, tasks


def realised_shares(batches: list[list[int]], lengths: list[int], tasks: list[str]) -> dict:
    counts = task_token_counts(batches, lengths, tasks)
    return {name: count / sum(counts.values()) for name, count in counts.items()}


def test_rates_follow_the_mixing_rule():
    tokens = {"a": 9000, "b": 1000}
    assert mixing_rates(tokens, mixing="proportional") == pytest.approx({"a": 0.9, "b": 0.1})
    # T=2: shares proportional to sqrt(tokens): 3:1
    assert mixing_rates(tokens, mixing="temperature", temperature=2.0) == pytest.approx(
        {"a": 0.75, "b": 0.25})
    assert mixing_rates(tokens, mixing="weights", weights={"a": 1.0, "b": 3.0}) == \
        pytest.approx({"a": 0.25, "b": 0.75})


# Over 600 micro-batches of 512 tokens (about 300,000 tokens, ~8,000 examples drawn), a token
# share's sampling error is well under 1 point; 2 points of tolerance fails a wrong rule (the
# rules here differ from each other by 10 points or more).
TOLERANCE = 0.02


@pytest.mark.parametrize("mixing,options", [
    ("proportional", {}),
    ("temperature", {"temperature": 3.0}),
    ("weights", {"weights": {"big": 1.0, "long": 1.0, "tiny": 2.0}}),
])
def test_realised_token_shares_match_the_configured_ones(mixing, options):
    lengths, tasks = synthetic_tasks()
    rates = mixing_rates(task_token_counts([range(len(lengths))], lengths, tasks),
                         mixing=mixing, **options)
    batches = schedule_mixture(lengths, tasks, rates, batch_tokens=512, packing=True, seed=0,
                               n_micro_batches=600)
    assert len(batches) == 600
    assert all(sum(lengths[i] for i in batch) <= 512 for batch in batches)
    realised = realised_shares(batches, lengths, tasks)
    for name, rate in rates.items():
        assert realised[name] == pytest.approx(rate, abs=TOLERANCE), (name, realised, rates)


def test_the_rules_give_different_mixtures():
    lengths, tasks = synthetic_tasks()
    tokens = task_token_counts([range(len(lengths))], lengths, tasks)
    proportional = mixing_rates(tokens, mixing="proportional")
    hot = mixing_rates(tokens, mixing="temperature", temperature=3.0)
    assert hot["tiny"] > proportional["tiny"] + 0.05  # temperature lifts the small task
    assert hot["big"] < proportional["big"] - 0.1


def test_same_seed_draws_the_same_schedule_and_a_small_task_cycles_whole_passes():
    lengths, tasks = synthetic_tasks()
    rates = {"big": 0.4, "long": 0.3, "tiny": 0.3}
    draw = lambda seed, n: schedule_mixture(lengths, tasks, rates,  # noqa: E731
                                            batch_tokens=256, packing=True, seed=seed,
                                            n_micro_batches=n)
    assert draw(0, 300) == draw(0, 300)
    assert draw(0, 300)[:100] == draw(0, 100)  # a longer run starts with the same draws
    assert draw(1, 300) != draw(0, 300)
    tiny = [i for batch in draw(0, 300) for i in batch if tasks[i] == "tiny"]
    # every tiny example once per pass: no example repeats before all 40 were drawn
    assert len(tiny) > 80
    assert sorted(tiny[:40]) == list(range(720, 760))
    assert sorted(tiny[40:80]) == list(range(720, 760))


def write_config(tmp_path: Path, tasks_yaml: str, extra: str = "") -> Path:
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            handle.write(json.dumps({"text": "the movie was good", "label": "positive"}) + "\n")
    path = tmp_path / "config.yaml"
    path.write_text("name: multi\ndata:\n" + extra + "  tasks:\n" + tasks_yaml)
    return path


TWO_TASKS = """\
    - name: sentiment
      train: a.jsonl
      prompt: "Review: {text}\\nSentiment:"
      completion: " {label}"
      eval: {task: classification, labels: [negative, positive]}
    - name: echo
      train: b.jsonl
      prompt: "Repeat: {text}\\n"
      completion: " {text}"
"""


def test_a_multitask_config_loads_with_resolved_task_files(tmp_path):
    config = load_config(write_config(tmp_path, TWO_TASKS, "  mixing: temperature\n"
                                      "  temperature: 3\n"))
    assert [task.name for task in config.data.tasks] == ["sentiment", "echo"]
    assert config.data.tasks[1].train == [str(tmp_path.resolve() / "b.jsonl")]
    assert config.data.tasks[0].eval.labels == ["negative", "positive"]
    assert config.data.tasks[1].eval is None and config.data.temperature == 3


@pytest.mark.parametrize("tasks_yaml,extra,message,line", [
    (TWO_TASKS.replace("      train: b.jsonl", "      trian: b.jsonl"), "",
     "unknown key 'data.tasks[1].trian'", 10),
    (TWO_TASKS.replace("      train: b.jsonl", "      train: missing.jsonl"), "",
     "data.tasks[1].train: data file", 10),
    (TWO_TASKS.replace("name: echo", "name: sentiment"), "", "'sentiment' is used twice", 2),
    (TWO_TASKS.replace("      train: b.jsonl", "      train: b.jsonl\n      weight: 2"), "",
     "task 'echo' has a weight, but data.mixing is proportional", 2),
    (TWO_TASKS.replace("      train: b.jsonl", "      train: b.jsonl\n      weight: 0"),
     "  mixing: weights\n", "'data.tasks[1].weight': Input should be greater than 0", 12),
    (TWO_TASKS, "  temperature: 4\n", "data.temperature only applies with data.mixing: "
     "temperature", 2),
    (TWO_TASKS, "  train: a.jsonl\n", "data.train and data.tasks are both given", 2),
    (TWO_TASKS, "  mixing: balanced\n", "'data.mixing': Input should be 'proportional'", 3),
    (TWO_TASKS.replace("{task: classification, labels: [negative, positive]}",
                       "{task: classification}"), "",
     "eval.task classification needs eval.labels", 8),
])
def test_bad_multitask_configs_name_the_key_and_line(tmp_path, tasks_yaml, extra, message,
                                                     line):
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, tasks_yaml, extra))
    text = caught.value.render()
    assert message in text
    assert f"config.yaml:{line}" in text


def test_a_top_level_eval_section_is_refused_with_tasks(tmp_path):
    path = write_config(tmp_path, TWO_TASKS)
    path.write_text(path.read_text() + "eval: {task: translation}\n")
    with pytest.raises(ConfigError, match="move the top-level eval section into the tasks"):
        load_config(path)


def test_unknown_task_key_hint_lists_the_task_keys(tmp_path):
    bad = TWO_TASKS.replace("      train: b.jsonl", "      train: b.jsonl\n      weigth: 2")
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, bad))
    assert "did you mean 'weight'?" in caught.value.render()
