"""Spec validation: every kind of bad input gets one clear line naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from service.spec import SpecError, load_spec, spec_json_schema

GOOD = """\
name: t
algorithm: value_iteration
env:
  id: FrozenLake-v1
  kwargs: {is_slippery: true}
params:
  gamma: 0.9
seeds: [0, 1]
"""

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True)
)


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def problems(tmp_path: Path, text: str | bytes, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides)
    return str(info.value)


def test_good_spec_resolves_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.params.gamma == 0.9  # type: ignore[attr-defined]
    assert spec.params.tol == 1e-6  # type: ignore[attr-defined]
    assert spec.resources.num_cpus == 1 and spec.seeds == [0, 1]


# (document, expected fragment: "file:line: field: ...")
def on_env(env_id: str, algorithm: str = "value_iteration", params: str = "gamma: 0.9") -> str:
    """GOOD with another env (no kwargs), algorithm and params line."""
    return (
        GOOD.replace("value_iteration", algorithm)
        .replace("FrozenLake-v1", env_id)
        .replace("{is_slippery: true}", "{}")
        .replace("gamma: 0.9", params)
    )


BAD = {
    "unknown top-level key": (GOOD + "sede: 1\n", ":9: sede: unknown field 'sede'"),
    "unknown nested key": (
        GOOD.replace("gamma: 0.9", "gama: 0.9"),
        ":7: params.gama: unknown field 'gama'; did you mean 'gamma'?",
    ),
    "unknown env key": (GOOD.replace("  id:", "  idd: x\n  id:"), ":4: env.idd: unknown field"),
    "unknown resources key": (GOOD + "resources: {cpus: 2}\n", ":9: resources.cpus: unknown field"),
    "wrong type": (
        GOOD.replace("gamma: 0.9", "gamma: high"),
        ":7: params.gamma: Input should be a valid number",
    ),
    "gamma = 1": (
        GOOD.replace("gamma: 0.9", "gamma: 1.0"),
        ":7: params.gamma: Input should be less than 1",
    ),
    "negative gamma": (
        GOOD.replace("gamma: 0.9", "gamma: -0.1"),
        ":7: params.gamma: Input should be greater than or equal to 0",
    ),
    "zero budget": (
        GOOD.replace("gamma: 0.9", "max_iterations: 0"),
        ":7: params.max_iterations: Input should be greater than 0",
    ),
    "negative budget": (
        GOOD.replace("gamma: 0.9", "eval_episodes: -5"),
        ":7: params.eval_episodes",
    ),
    "zero cpus": (GOOD + "resources: {num_cpus: 0}\n", ":9: resources.num_cpus"),
    "duplicate seeds": (GOOD.replace("[0, 1]", "[1, 1]"), ":8: seeds: seeds must be distinct"),
    "negative seed": (GOOD.replace("[0, 1]", "[0, -1]"), ":8: seeds"),
    "no seeds": (GOOD.replace("[0, 1]", "[]"), ":8: seeds"),
    "unknown algorithm": (
        GOOD.replace("value_iteration", "value_iter"),
        ":2: algorithm: unknown algorithm 'value_iter'; did you mean 'value_iteration'?",
    ),
    "missing algorithm": ("name: t\nenv: {id: FrozenLake-v1}\n", "algorithm: field required"),
    "missing env": ("name: t\nalgorithm: value_iteration\n", "env: field required"),
    "blank name": (GOOD.replace("name: t", "name: '  '"), "spec.yaml:1: name: must not be blank"),
    "unknown env id": (
        GOOD.replace("FrozenLake-v1", "FrozenLak-v1"),
        ":4: env.id: unknown environment 'FrozenLak-v1'; did you mean 'FrozenLake-v1'?",
    ),
    "module:Class env id": (
        GOOD.replace("FrozenLake-v1", "os:Evil-v0"),
        ":4: env.id: 'os:Evil-v0' would make gymnasium import module 'os'",
    ),
    "env without a model": (
        on_env("CartPole-v1"),
        ":4: env.id: 'CartPole-v1': exposes no transition model",
    ),
    "dqn on a continuous-action env": (
        on_env("Pendulum-v1", "dqn", "gamma: 0.99"),
        ":4: env.id: 'Pendulum-v1': DQN needs a discrete action space",
    ),
    "a CNN for vector observations": (
        on_env("CartPole-v1", "dqn", "network: nature_cnn"),
        ":7: params.network: 'nature_cnn' on 'CartPole-v1': network nature_cnn needs image",
    ),
    "q_learning on a continuous-state env": (
        on_env("CartPole-v1", "q_learning"),
        ":4: env.id: 'CartPole-v1': tabular Q-learning needs a Discrete, MultiDiscrete or Tuple-of-Discrete observation",
    ),
    "dqn field out of range": (
        on_env("CartPole-v1", "dqn", "n_step: 0"),
        ":7: params.n_step: Input should be greater than or equal to 1",
    ),
    "a number that overflows to inf": (
        GOOD.replace("gamma: 0.9", "tol: 1e999"),
        ":7: params.tol: Input should be a finite number",
    ),
    "nan": (
        GOOD.replace("[0, 1]", "[0, 1]\nresources: {num_cpus: .nan}"),
        ":9: resources.num_cpus",
    ),
    "nested too deeply": (
        GOOD + "tags: {a: " + "[" * 2000 + "]" * 2000 + "}\n",
        "nested too deeply",
    ),
    "an integer Python will not read": (
        GOOD.replace("[0, 1]", "[" + "9" * 5000 + "]"),
        "unreadable value: Exceeds the limit (4300 digits)",
    ),
    "a tag MLflow refuses": (GOOD + "tags: {'a,b': x}\n", ":9: tags: tag 'a,b': MLflow names"),
    "a tag MLflow sets": (GOOD + "tags: {mlflow.runName: x}\n", ":9: tags: tag 'mlflow.runName'"),
    "a tag value MLflow cannot store": (
        GOOD + f"tags: {{a: {'x' * 8001}}}\n",
        ":9: tags: tag 'a': a value of at most 8000 characters",
    ),
    "a description MLflow cannot store": (
        GOOD + f"description: {'x' * 8001}\n",
        ":9: description: String should have at most 8000 characters",
    ),
    "a window on a headless worker": (
        GOOD.replace("{is_slippery: true}", "{is_slippery: true, render_mode: human}"),
        ":5: env.kwargs.render_mode: 'human' opens a window",
    ),
    "a layer of width 0": (
        on_env("CartPole-v1", "dqn", "hidden_sizes: [64, 0]"),
        ":7: params.hidden_sizes[1]: Input should be greater than 0",
    ),
    "bad env kwargs": (
        GOOD.replace("is_slippery", "slippery"),
        ":5: env: cannot create 'FrozenLake-v1'",
    ),
    "empty file": ("", "spec.yaml: empty file"),
    "only a comment": ("# nothing\n", "spec.yaml: empty document"),
    "yaml syntax error": ("name: t\nparams: {gamma: 0.9\n", "YAML error"),
    "bad indentation": ("name: t\n  algorithm: x\n", "spec.yaml:2: YAML error"),
    "list document": ("- 1\n- 2\n", "spec.yaml:1: the document must be a mapping, not a list"),
    "scalar document": ("just text\n", "the document must be a mapping, not a str"),
    "alias bomb": (BILLION_LAUGHS, "YAML alias bomb"),
    "recursive alias": ("a: &a [*a]\n", "recursive YAML alias"),
    "python tag": (
        "name: !!python/object/apply:os.system [echo hi]\n",
        "spec.yaml:1: YAML error: could not determine a constructor",
    ),
    "duplicate key": (GOOD + "name: u\n", ":9: name: duplicate key"),
    "a boolean for a number": (
        GOOD.replace("gamma: 0.9", "max_iterations: yes"),
        ":7: params.max_iterations: expected a number, not a boolean",
    ),
    "a boolean for a seed": (
        GOOD.replace("[0, 1]", "[0, true]"),
        ":8: seeds[1]: expected a number",
    ),
    "a boolean in a list of numbers": (
        on_env("CartPole-v1", "dqn", "hidden_sizes: [64, true]"),
        ":7: params.hidden_sizes[1]: expected a number, not a boolean",
    ),
    "not utf-8": (
        b"name: caf\xe9\nalgorithm: value_iteration\n",
        "spec.yaml:1: file is not valid UTF-8",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    text, fragment = BAD[case]
    message = problems(tmp_path, text)
    assert fragment in message, message
    assert message.startswith(str(tmp_path / "spec.yaml"))


def test_syntax_error_names_its_line(tmp_path: Path) -> None:
    message = problems(tmp_path, "name: t\nalgorithm: value_iteration\nparams: [1, 2\nseeds: [0]\n")
    assert "spec.yaml:4: YAML error" in message or "spec.yaml:3: YAML error" in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("gamma: 0.9", "gamma: 2\n  tol: -1\n  what: 1")
    lines = problems(tmp_path, text).splitlines()
    assert len(lines) == 3
    assert any(":7: params.gamma" in ln for ln in lines)
    assert any(":8: params.tol" in ln for ln in lines)
    assert any(":9: params.what" in ln for ln in lines)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("params.gama=0.5", "--set params.gama=0.5: params.gama: unknown field 'gama'"),
        ("params.gamma=1.5", "--set params.gamma=1.5: params.gamma: Input should be less than 1"),
        ("nope=1", "--set nope=1: nope: unknown field"),
        ("params.gamma", "--set params.gamma: expected FIELD.PATH=VALUE"),
        ("name.x=1", "--set name.x=1: name: is not a mapping"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, fragment: str) -> None:
    assert fragment in problems(tmp_path, GOOD, (override,))


def test_overrides_apply_with_yaml_values(tmp_path: Path) -> None:
    spec = load_spec(
        write(tmp_path, GOOD),
        ["params.gamma=0.5", "seeds=[3, 4, 5]", "env.kwargs.map_name=8x8", "resources.num_cpus=2"],
    )
    assert spec.params.gamma == 0.5  # type: ignore[attr-defined]
    assert spec.seeds == [3, 4, 5]
    assert spec.env.kwargs == {"is_slippery": True, "map_name": "8x8"}  # type: ignore[attr-defined]
    assert spec.resources.num_cpus == 2.0


def test_allowed_env_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import get_settings

    monkeypatch.setenv("RLGEN_ALLOWED_ENV_MODULES", '["gymnasium.envs.toy_text"]')
    get_settings.cache_clear()
    try:
        spec = load_spec(
            write(tmp_path, GOOD.replace("FrozenLake-v1", "gymnasium.envs.toy_text:FrozenLake-v1"))
        )
        assert spec.env.id.endswith(":FrozenLake-v1")  # type: ignore[attr-defined]
        assert "would make gymnasium import module 'os'" in problems(
            tmp_path, GOOD.replace("FrozenLake-v1", "os:Evil-v0")
        )
    finally:
        get_settings.cache_clear()


RBM = """\
name: t
algorithm: rbm
dataset:
  name: idx
  images: IMAGES
params: {epochs: 1}
"""


def test_dataset_path_that_does_not_exist(tmp_path: Path) -> None:
    message = problems(tmp_path, RBM.replace("IMAGES", str(tmp_path / "nope.gz")))
    assert "spec.yaml:5: dataset.images: no such file" in message


def test_dataset_file_that_is_not_idx(tmp_path: Path) -> None:
    (tmp_path / "junk.gz").write_bytes(b"not idx at all")
    message = problems(tmp_path, RBM.replace("IMAGES", str(tmp_path / "junk.gz")))
    assert "spec.yaml:5: dataset.images:" in message and "bad header" in message


def test_unknown_dataset_and_default(tmp_path: Path) -> None:
    assert "dataset.name" in problems(tmp_path, "name: t\nalgorithm: rbm\ndataset: {name: cifar}\n")
    spec = load_spec(write(tmp_path, "name: t\nalgorithm: rbm\n"))
    assert spec.dataset.name == "digits"  # type: ignore[attr-defined]


def test_json_schema_covers_every_algorithm() -> None:
    from service.registry import ALGORITHMS

    schema = spec_json_schema()
    text = json.dumps(schema)
    for name in ALGORITHMS:
        assert f'"const": "{name}"' in text
    assert "epsilon-optimal" in text  # field descriptions are carried into the schema


def test_empty_sections_take_their_defaults(tmp_path: Path) -> None:
    """`params:` or `seeds:` with nothing under them (YAML null) read as absent."""
    spec = load_spec(write(tmp_path, "name: t\nalgorithm: rbm\nparams:\nseeds:\ntags:\n"))
    assert spec.params == load_spec(write(tmp_path, "name: t\nalgorithm: rbm\n")).params  # type: ignore[attr-defined]
    assert spec.seeds == [0]
    # A required field left empty is still an error, on its line.
    assert "spec.yaml:2: algorithm: field required" in problems(tmp_path, "name: t\nalgorithm:\n")
    assert "spec.yaml:1: name" in problems(tmp_path, "name:\nalgorithm: rbm\n")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads 1e5 and 3e-4 as strings; specs read them as numbers, as YAML 1.2,
    JSON and Python do, in the file and in --set overrides."""
    text = (
        "name: t\nalgorithm: dqn\nenv: {id: CartPole-v1}\n"
        "params: {total_timesteps: 1e5, learning_rate: 3e-4, tau: 1E-2}\n"
    )
    spec = load_spec(write(tmp_path, text), ["params.buffer_size=2.5e4"])
    params = spec.params  # type: ignore[attr-defined]
    assert (params.total_timesteps, params.buffer_size) == (100_000, 25_000)
    assert (params.learning_rate, params.tau) == (3e-4, 1e-2)
    assert "got a number with a fractional part" in problems(tmp_path, text.replace("1e5", "1.5e0"))


def test_cuda_without_a_reserved_gpu_is_refused(tmp_path: Path) -> None:
    base = "name: t\nalgorithm: rbm\nresources: {device: cuda%s}\n"
    assert "spec.yaml:3: resources: device 'cuda' needs num_gpus > 0" in problems(
        tmp_path, base % ""
    )
    assert load_spec(write(tmp_path, base % ", num_gpus: 0.5")).resources.num_gpus == 0.5


def test_what_rlgen_writes_reads_back_the_same(tmp_path: Path) -> None:
    """Strings that look like YAML 1.2 numbers (an API id '9397861e0537') are quoted when rlgen
    writes a spec (API jobs, spec.yaml artifacts), or they would come back as floats."""
    from service.spec import dump_yaml, load_spec_text, to_yaml

    ids = {"a": "9397861e0537", "b": "1e5", "c": "0123", "d": "12", "e": "3e-4"}
    spec = load_spec(write(tmp_path, "name: t\nalgorithm: rbm\n"))
    spec = spec.model_copy(update={"tags": ids})
    assert load_spec_text(to_yaml(spec).encode(), "x").tags == ids
    assert yaml.load(dump_yaml({"tags": ids}), Loader=yaml.SafeLoader) == {"tags": ids}


def test_frozenlake_random_lake_is_drawn_once_and_recorded(tmp_path: Path) -> None:
    """`map_name: null` makes gymnasium draw a random lake from numpy's global RNG at every
    gym.make: value iteration solved one lake and was evaluated on another (return 0 on a
    deterministic lake it had solved). The lake is drawn once, at load, into `kwargs.desc`."""
    from agents import value_iteration
    from runctx import RunContext
    from service.spec import load_spec_text, to_yaml

    text = (
        b"name: t\nalgorithm: value_iteration\n"
        b"env: {id: FrozenLake-v1, kwargs: {map_name: null, is_slippery: false}}\n"
    )
    spec = load_spec_text(text, "lake.yaml")
    desc = spec.env.kwargs["desc"]  # type: ignore[attr-defined]
    assert len(desc) == 8 and desc[0][0] == "S" and desc[-1][-1] == "G"
    assert load_spec_text(text, "again.yaml").env.kwargs["desc"] == desc  # type: ignore[attr-defined]
    assert load_spec_text(to_yaml(spec).encode(), "resolved.yaml") == spec  # what a trial reads
    for _ in range(2):  # the training env and the evaluation env
        lake = spec.env.make().unwrapped.desc.astype(str)  # type: ignore[attr-defined]
        assert ["".join(row) for row in lake] == desc

    ctx = RunContext.in_memory(workdir=tmp_path, env=spec.env)  # type: ignore[attr-defined]
    value_iteration.train(spec.params, ctx)  # type: ignore[attr-defined]
    ctx.close()
    assert ctx.writer.metrics["eval/return_mean"][-1][1] == 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("algorithm", "params", "fix"),
    [
        ("rbm", "{}", "{visible: gaussian}"),
        ("dbn", "{}", "{pretrain: false}"),
        ("vae", "{}", "{likelihood: gaussian}"),
        ("autoencoder", "{}", None),
        ("gan", "{}", None),
    ],
)
def test_models_of_unit_pixels_refuse_standardised_data(
    tmp_path: Path, algorithm: str, params: str, fix: str | None
) -> None:
    """A Bernoulli likelihood or a sigmoid output cannot fit pixels outside [0, 1]: the trial
    used to run to its end on a loss unbounded below."""
    text = f"name: t\nalgorithm: {algorithm}\ndataset:\n  name: digits\n  scale: standardize\n"
    msg = problems(tmp_path, text + f"params: {params}\n")
    assert "spec.yaml:5: dataset.scale:" in msg and "[0, 1]" in msg
    assert load_spec(write(tmp_path, text.replace("standardize", "unit") + f"params: {params}\n"))
    if fix is not None:
        assert load_spec(write(tmp_path, text + f"params: {fix}\n"))
        swept = text + f"params: {fix}\nsweep:\n  params:\n"
        field, value = fix.strip("{}").split(": ")
        other = {"gaussian": "bernoulli", "false": "true"}[value]
        msg = problems(tmp_path, swept + f"    {field}: {{grid: [{value}, {other}]}}\n")
        assert f"spec.yaml:9: sweep.params.{field}: " in msg and "[0, 1]" in msg


def test_a_bare_list_in_a_sweep_is_a_grid(tmp_path: Path) -> None:
    from service.execution import expand

    base = GOOD + "sweep:\n  params:\n    gamma: %s\n"
    bare = load_spec(write(tmp_path, base % "[0.9, 0.99]"))
    explicit = load_spec(write(tmp_path, base % "{grid: [0.9, 0.99]}"))
    assert bare == explicit and len(expand(bare)) == 4  # 2 values x 2 seeds
    assert "spec.yaml:11: sweep.params.gamma: 1.5: Input should be less than 1" in problems(
        tmp_path, base % "[0.9, 1.5]"
    )
    assert "spec.yaml:11: sweep.params.gamma: False: expected a number, not a boolean" in problems(
        tmp_path, base % "[0.9, false]"
    )


def test_the_param_at_fault_is_the_one_whose_default_would_run() -> None:
    """Validation points at the param that makes an env unusable, and at the env when no
    param's default would help; every RL config builds from its defaults for this."""
    import gymnasium as gym

    from agents import dqn
    from service.registry import ALGORITHMS
    from service.spec.checks import param_at_fault

    algo = ALGORITHMS["dqn"]
    cartpole, pendulum = gym.make("CartPole-v1"), gym.make("Pendulum-v1")
    params = dqn.Config(network="minatar_cnn", gamma=0.9, batch_size=8)
    assert param_at_fault(algo, cartpole, params) == "network"
    assert param_at_fault(algo, pendulum, params) is None  # continuous actions: the env
    assert param_at_fault(algo, cartpole, dqn.Config(gamma=0.9)) is None
    for a in ALGORITHMS.values():
        if a.check_env is not None:
            a.config()
