"""Method settings: per-method config dataclasses, plan syntax, one-line errors, the CLI's --method-arg, and
what reports and checkpoints record. Fast: random matrices and a tiny random Llama (with MiniLM's tokenizer
alone, for calibration text)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tiny_llama
from rankwise.decomposition import (
    CalibrationStats,
    MethodConfig,
    SolverConfig,
    available_methods,
    get_method,
    method_settings,
)
from rankwise.decomposition.apply import decompose_ as decompose
from rankwise.decomposition.asvd import ASVD, ASVDConfig
from rankwise.decomposition.svd_llm import whitening
from rankwise.design.plan import MethodSpec, Plan
from rankwise.errors import PlanError

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {
    "tucker": {"solver": "auto", "oversample": 2},
    "svd": {"solver": "auto", "oversample": 2},
    "asvd": {"solver": "auto", "oversample": 2, "alpha": 0.5},
    "svd-llm": {"solver": "auto", "oversample": 2, "damping": 0.0},
    "fwsvd": {"solver": "auto", "oversample": 2},
}


def _stats(n: int, m: int, seed: int = 0) -> CalibrationStats:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(200, n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    return CalibrationStats(gram=X.T @ X, act_abs_mean=X.abs().mean(0).float(),
                            fisher=torch.rand(m, n, generator=gen), n_tokens=200)


# --- configs ------------------------------------------------------------------------------------------------
def test_every_method_has_a_frozen_config_with_todays_defaults():
    assert set(DEFAULTS) <= set(available_methods())
    for name, defaults in DEFAULTS.items():
        method = get_method(name)
        assert isinstance(method.config, SolverConfig) and isinstance(method.config, MethodConfig)
        assert method.settings() == {"name": name, **defaults}
        with pytest.raises(AttributeError):  # frozen: a method's settings cannot drift after it is built
            method.config.solver = "lapack"  # type: ignore[misc]


def test_three_ways_to_configure_agree_and_names_are_case_insensitive():
    a = get_method("ASVD", alpha=0.25, solver="gram")
    b = ASVD(ASVDConfig(alpha=0.25, solver="gram"))
    c = get_method(MethodSpec.parse({"name": "Asvd", "alpha": "0.25", "solver": "GRAM"}))
    assert a.config == b.config == c.config == ASVDConfig(alpha=0.25, solver="gram")
    assert method_settings({"name": "asvd", "alpha": 0.25}) == {"name": "asvd", **DEFAULTS["asvd"], "alpha": 0.25}


def test_asvd_alpha_sets_the_channel_scaling():
    """alpha is wired through: the factors are the truncated SVD of W·diag(mean|x|^alpha), unscaled."""
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    stats = _stats(40, 24)
    for alpha in (0.25, 1.0):
        approx = get_method("asvd", alpha=alpha).decompose(W, 5, stats).factors.reconstruct().double()
        s = stats.act_abs_mean.double() ** alpha
        U, sv, Vh = torch.linalg.svd(W.double() * s, full_matrices=False)
        expected = (U[:, :5] * sv[:5]) @ Vh[:5] / s
        assert torch.allclose(approx, expected, atol=1e-4), alpha
    default = get_method("asvd").decompose(W, 5, stats).factors.reconstruct()
    explicit = get_method("asvd", alpha=0.5).decompose(W, 5, stats).factors.reconstruct()
    quarter = get_method("asvd", alpha=0.25).decompose(W, 5, stats).factors.reconstruct()
    assert torch.equal(default, explicit) and not torch.allclose(default, quarter)


def test_svd_llm_damping_whitens_the_damped_gram():
    stats = _stats(32, 20)
    W = torch.randn(20, 32, generator=torch.Generator().manual_seed(2))
    damped = whitening(stats.gram, 32, [], damping=0.1).S
    scale = float(torch.diagonal(stats.gram).mean())
    by_hand = whitening(stats.gram + 0.1 * scale * torch.eye(32, dtype=torch.float64), 32, []).S
    assert torch.allclose(damped, by_hand, rtol=1e-10, atol=1e-10)
    none = get_method("svd-llm").decompose(W, 4, stats).factors.reconstruct()
    zero = get_method("svd-llm", damping=0).decompose(W, 4, stats).factors.reconstruct()
    some = get_method("svd-llm", damping=0.1).decompose(W, 4, stats).factors.reconstruct()
    assert torch.equal(none, zero) and not torch.allclose(none, some)


@pytest.mark.parametrize("method", ["tucker", "svd"])
def test_solver_setting_picks_the_solver_and_each_is_optimal(method):
    gen = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(400, 400, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(420, 400, generator=gen)).Q
    W = (U * 0.8 ** torch.arange(400.0)) @ V.T  # a decaying spectrum: Krylov converges without falling back
    errors = {}
    for solver, oversample in [("lapack", 2), ("gram", 2), ("krylov", 0), ("krylov", 6)]:
        result = get_method(method, solver=solver, oversample=oversample).decompose(W, 1)
        assert result.solver.startswith(solver)
        errors[(solver, oversample)] = float(torch.linalg.norm(W - result.factors.reconstruct()))
    best = min(errors.values())
    assert all(e == pytest.approx(best, rel=1e-5) for e in errors.values()), errors
    assert get_method(method).decompose(W, 1).solver == "gram"  # auto: k = 400 is too small for Krylov


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "message"), [
    ({"alpha": 2}, "asvd.alpha: must be a number in (0, 1], got 2"),
    ({"alpha": 0}, "asvd.alpha: must be a number in (0, 1]"),
    ({"alpha": "half"}, "asvd.alpha: must be a number in (0, 1], got 'half'"),
    ({"alpha": True}, "asvd.alpha: must be a number"),
    ({"alpha": float("nan")}, "asvd.alpha: must be a number"),
    ({"alfa": 0.5}, "asvd.alfa: unknown setting (known: alpha, oversample, solver)"),
    ({"solver": "magic"}, "asvd.solver: must be one of auto, gram, krylov, lapack, got 'magic'"),
    ({"oversample": -1}, "asvd.oversample: must be an integer >= 0, got -1"),
    ({"oversample": 2.5}, "asvd.oversample: must be an integer >= 0"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(settings, message):
    with pytest.raises(PlanError) as info:
        get_method("asvd", **settings)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("plan", "message"), [
    ({"method": {"name": "asvd", "alpha": 1.5}}, "method.alpha: must be a number in (0, 1], got 1.5"),
    ({"overrides": [{"layers": [0], "method": {"name": "asvd", "alpha": 0}}]},
     "overrides[0].method.alpha: must be a number in (0, 1]"),
    ({"overrides": [{"layers": [0], "method": {"name": "svd-llm", "damping": -1}}]},
     "overrides[0].method.damping: must be a number >= 0"),
    ({"overrides": [{"layers": [0], "method": {"name": "svd", "alpha": 0.5}}]},
     "overrides[0].method.alpha: unknown setting (known: oversample, solver)"),
])
def test_bad_settings_in_a_plan_name_the_plan_field_before_the_model_changes(plan, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError) as info:
        decompose(model, {"layers": [0], "tensors": ["q"], "rank": 2, **plan}, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("text", "message"), [
    ("method: {alpha: 0.5}", "method.name: missing"),
    ("method: {name: 3}", "method.name: expected a method name, got 3"),
    ("method: [asvd]", "method: expected a method name"),
    ("overrides: [{layers: [1], method: {name: asvd, alpha: [1, 2]}}]",
     "overrides[0].method.alpha: expected a number, a string or true/false"),
])
def test_plan_syntax_errors_for_methods(text, message):
    with pytest.raises(PlanError) as info:
        Plan.from_text(text)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- plans --------------------------------------------------------------------------------------------------
PLAN_YAML = """
method: {name: ASVD, alpha: 0.25, solver: gram}
rank: 4
layers: all
tensors: [q, up]
overrides:
  - {layers: [1], tensors: [q], method: SVD}
  - {layers: [0], tensors: [up], method: {name: svd-llm, damping: 1.0e-3}}
"""


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_plan_round_trip_keeps_settings_and_stays_terse(fmt):
    plan = Plan.from_text(PLAN_YAML)
    assert plan.method == MethodSpec("asvd", (("alpha", 0.25), ("solver", "gram")))
    assert plan.overrides[0].method == MethodSpec("svd")
    text = plan.to_yaml() if fmt == "yaml" else plan.to_json()
    again = Plan.from_text(text, fmt)
    assert again == plan and Plan.from_dict(plan.to_dict()) == plan
    assert plan.to_dict()["method"] == {"name": "asvd", "alpha": 0.25, "solver": "gram"}  # only what was given
    assert plan.to_dict()["overrides"][0]["method"] == "svd"


def test_a_rule_method_replaces_the_inherited_one_whole():
    model = tiny_llama()
    report = decompose(model, Plan.simple(layers="all", tensors="q", rank=2, method={"name": "svd", "solver": "lapack"}),
                       progress=False)
    assert {t.method_settings["solver"] for t in report.targets} == {"lapack"}
    plan = Plan.from_dict({"method": {"name": "svd", "solver": "lapack"}, "layers": "all", "tensors": ["q"],
                           "rank": 2, "overrides": [{"layers": [1], "tensors": ["q"], "method": "svd"}]})
    report = decompose(tiny_llama(), plan, progress=False)
    assert [t.method_settings["solver"] for t in report.targets] == ["lapack", "auto"]
    assert [t.solver for t in report.targets] == ["lapack", "gram"]


# --- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with MiniLM's tokenizer (a real tokenizer, loaded alone: no model load)."""
    from transformers import AutoTokenizer

    from rankwise.models.bundled import BUNDLED

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED["minilm-l6"].locate())
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(vocab=len(tokenizer), layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib(tmp_path_factory, data_dir) -> list[str]:
    """Calibration flags: 4 windows of 32 tokens from the first 20,000 characters of WikiText-2 validation."""
    text = (data_dir / "wikitext-2-tokens" / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    path = tmp_path_factory.mktemp("calib") / "wiki-valid-head.txt"
    path.write_text(text, encoding="utf-8")
    return ["--calib-data", str(path), "--calib-samples", "4", "--calib-seq-len", "32", "--no-calib-cache", "-q"]


def _factors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_cli_method_arg_and_plan_give_the_same_checkpoint(tiny_folder, calib, tmp_path, capsys):
    flags = ["--layers", "0,1", "--tensors", "q,up", "--rank", "4"]
    cli_out, plan_out, default_out = tmp_path / "cli", tmp_path / "plan", tmp_path / "default"
    code, _, err = run_cli(["decompose", str(tiny_folder), *flags, "--method", "ASVD", "--method-arg", "alpha=0.25",
                            "--method-arg", "solver=gram", "-o", str(cli_out), *calib], capsys)
    assert code in (0, None), err
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("layers: [0, 1]\ntensors: [q, up]\nrank: 4\nmethod: {name: asvd, alpha: 0.25, solver: gram}\n")
    code, _, err = run_cli(["decompose", str(tiny_folder), "--plan", str(plan_file), "-o", str(plan_out), *calib],
                           capsys)
    assert code in (0, None), err
    code, _, err = run_cli(["decompose", str(tiny_folder), *flags, "--method", "asvd", "-o", str(default_out), *calib],
                           capsys)
    assert code in (0, None), err

    a, b, c = _factors(cli_out), _factors(plan_out), _factors(default_out)
    assert a.keys() == b.keys() and any(k.endswith("q_proj.first.weight") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(not torch.equal(a[k], c[k]) for k in a if ".first." in k or ".last." in k)  # alpha took effect

    full = {"name": "asvd", "solver": "gram", "oversample": 2, "alpha": 0.25}
    for out in (cli_out, plan_out):
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["plan"]["method"] == full
        report = json.loads((out / "decomposition_report.json").read_text())
        assert report["plan"]["method"] == full
        assert all(t["method"] == "asvd" and t["method_settings"] == full for t in report["targets"])
    default = json.loads((default_out / "decomposition_report.json").read_text())
    assert default["plan"]["method"] == {"name": "asvd", **DEFAULTS["asvd"]}


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "0", "--method", "asvd", "--method-arg", "alpha=2"], "--method-arg alpha: must be a number in (0, 1]"),
    (["--layers", "0", "--method", "asvd", "--method-arg", "alfa=1"], "--method-arg alfa: unknown setting"),
    (["--layers", "0", "--method-arg", "alpha=0.5"], "--method-arg alpha: unknown setting (known: oversample, solver)"),
    (["--layers", "0", "--method", "svd", "--method-arg", "solver"], "--method-arg: expected KEY=VALUE"),
    (["--layers", "0", "--method", "svd", "--method-arg", "oversample=two"], "--method-arg oversample: must be an integer"),
    (["--layers", "0", "--method", "pca"], "--method: unknown method 'pca'"),
    (["--plan", "PLAN", "--method-arg", "alpha=0.5"], "give either --plan FILE or"),
    (["--plan", "PLAN", "--method", "svd"], "give either --plan FILE or"),
    (["--plan", "BAD_PLAN"], "overrides[0].method.alpha: must be a number in (0, 1], got 3"),
])
def test_cli_bad_method_settings_fail_before_loading(args, message, tmp_path, capsys):
    (tmp_path / "plan.yaml").write_text("layers: [0]\ntensors: all\n")  # a plan names its layers and tensors
    (tmp_path / "bad.yaml").write_text("layers: [0]\ntensors: all\noverrides: [{layers: [0], method: {name: asvd, alpha: 3}}]\n")
    args = [str(tmp_path / "plan.yaml") if a == "PLAN" else str(tmp_path / "bad.yaml") if a == "BAD_PLAN" else a
            for a in args]
    out = tmp_path / "out"
    # the model argument does not exist: the error must come from the settings, before any load is tried
    code, _, err = run_cli(["decompose", str(tmp_path / "no-such-model"), *args, "-o", str(out), "-q"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and not out.exists()


# --- every flag a message or the README names exists ---------------------------------------------------------
#: Packages whose user-facing messages are scanned: those behind today's commands, plus the registered command
#: modules themselves. A package gains its entry when its command is registered in rankwise.cli.main (until
#: then its messages may name flags of a command still being written).
SCANNED = ("analysis", "caches.py", "calibration", "checkpoint", "cli/main.py", "decomposition",
           "decomposition_report.py", "design", "efficiency", "errors.py", "evaluation", "fileio.py", "layers",
           "models", "settings.py", "surgery.py")
EXTERNAL_FLAGS = {"--no-deps"}  # pip's, in the install instructions
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def _command_options() -> set[str]:
    import typer

    from rankwise.cli.main import app

    opts = {"--help"}
    todo = [typer.main.get_command(app)]
    while todo:  # commands and the sub-commands of groups (``rankwise study run``)
        command = todo.pop()
        todo.extend(getattr(command, "commands", {}).values())
        for param in command.params:
            opts.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return opts


def test_every_flag_named_in_messages_and_readme_exists():
    from rankwise.cli.main import COMMAND_MODULES

    src = REPO / "src" / "rankwise"
    commands = [f"cli/{module.rpartition('.')[2]}.py" for module in COMMAND_MODULES]
    mentioned: dict[str, set[str]] = {}
    for entry in (*SCANNED, *commands):
        for path in ([src / entry] if entry.endswith(".py") else sorted((src / entry).rglob("*.py"))):
            if not path.exists():
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for flag in FLAG.findall(node.value):
                        mentioned.setdefault(flag, set()).add(str(path.relative_to(REPO)))
    readme = (REPO / "README.md").read_text()
    # bench/ scripts have their own flags; the README's rankwise sections are everything else
    for flag in FLAG.findall("\n".join(line for line in readme.splitlines() if "bench/" not in line)):
        mentioned.setdefault(flag, set()).add("README.md")
    missing = {flag: sorted(where) for flag, where in mentioned.items()
               if flag not in _command_options() | EXTERNAL_FLAGS}
    assert not missing, f"flags named to users but accepted by no rankwise command: {missing}"
    assert {"--seq-len", "--method-arg", "--calib-seq-len"} <= _command_options()


def test_eval_seq_len_flag_reaches_the_task(tiny_folder, tmp_path, capsys):
    """``--seq-len`` (named by the wikitext/gsm8k messages) is accepted and sets the perplexity window."""
    out = tmp_path / "results.json"
    code, _, err = run_cli(["eval", str(tiny_folder), "--tasks", "wikitext_token", "--seq-len", "16", "--limit", "2",
                            "--json", str(out), "-q"], capsys)
    assert code in (0, None), err
    data = json.loads(out.read_text())
    assert data["options"]["seq_len"] == 16
    protocol = data["results"]["wikitext_token"]["protocol"]
    assert protocol["seq_len"] == 16 and protocol["predicted_tokens"] == 2 * 15
