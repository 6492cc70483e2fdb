"""Settings a user gives are checked with errors that `python -O` keeps: an `assert` there
would vanish, and the run go on with a setting that cannot work."""

import subprocess
import sys

BAD_SETTINGS = [
    ("lkg_pipeline.core.data.prepare", "PrepareConfig(min_user_interactions=2)", "leave-one-out"),
    ("lkg_pipeline.core.kg.graph", "KGConfig(co_rated_top_n=-1)", "co_rated_top_n=-1"),
    ("lkg_pipeline.core.paths.enumeration", "PathConfig(max_hops=4)", "max_hops=4"),
    ("lkg_pipeline.core.paths.preference.model", "PreferenceConfig(lr=0.0)", "lr=0.0"),
    ("lkg_pipeline.core.llm.prompts", "PromptConfig(max_prompt_tokens=10)", "max_prompt_tokens"),
    ("lkg_pipeline.core.llm.train.config", "TrainConfig(lora_layers=0)", "lora_layers"),
    ("lkg_pipeline.core.evaluate.compare", "EvaluationConfig(ks=(1, 10, 30))", "ks must be in"),
    ("lkg_pipeline.core.evaluate.ltr", "LtrConfig(n_folds=2)", "n_folds=2"),
    ("lkg_pipeline.core.evaluate.recommend", "RecommendConfig(top_n=0)", "top_n"),
]


def test_bad_settings_fail_with_value_errors_even_under_python_O() -> None:
    lines = [f"from {module} import *" for module, _, _ in BAD_SETTINGS]
    for _, call, _ in BAD_SETTINGS:
        lines += [
            "try:",
            f"    {call}",
            f"    print({call!r}, 'accepted', sep='\\t')",
            "except ValueError as error:",
            f"    print({call!r}, 'ValueError', error, sep='\\t')",
        ]
    result = subprocess.run(
        [sys.executable, "-O", "-c", "\n".join(lines)], capture_output=True, text=True, check=True
    )
    said = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    for _, call, message in BAD_SETTINGS:
        assert said[call].startswith("ValueError") and message in said[call], (call, said[call])
