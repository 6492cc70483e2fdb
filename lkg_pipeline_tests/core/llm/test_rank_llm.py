"""`core.llm.rank.job` under `accelerate launch` and Dagster Pipes: the prompts split across
processes rank exactly as one process ranks them, and only the main process reports."""

import json
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest
from transformers import AutoTokenizer

from lkg_pipeline.core.llm.rank.job import RankJob, build_parser, job_from_args, script_args
from lkg_pipeline.core.llm.rank.scoring import RANKING_COLUMNS, load_ranker, rank_prompts
from lkg_pipeline_tests.core.tiny_llm import prompt_table
from lkg_pipeline_tests.pipes_launch import launched

SCRIPT = ["-m", "lkg_pipeline.core.llm.rank"]
LAUNCH_1 = [
    sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    "--num_cpu_threads_per_process", "1", *SCRIPT,
]  # fmt: skip
# Two CPU processes: `accelerate launch --cpu` needs mpirun for that, torchrun does not (as in
# test_train_lora); PartialState then reads ACCELERATE_USE_CPU as accelerate's launchers set it.
TORCHRUN_2 = [
    str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
    *SCRIPT,
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prompts_split_over_two_processes_rank_as_one_process_does(
    tiny_with_adapter, tmp_path: Path
) -> None:
    base, trained, _ = tiny_with_adapter
    adapter = Path(shutil.copytree(trained, tmp_path / "adapter"))
    (adapter / "training.json").write_text(json.dumps({"config": {"retriever_prior": False}}))
    prompts = prompt_table(9)
    given = tmp_path / "prompts.parquet"
    prompts.write_parquet(given)
    model = load_ranker(base, adapter, device="cpu")
    expected = rank_prompts(model, AutoTokenizer.from_pretrained(base), prompts, batch_size=1)
    tables = {}
    for name, command, env in [
        ("one", LAUNCH_1, {}),
        ("two", TORCHRUN_2, {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}),
    ]:
        output = tmp_path / f"{name}.parquet"
        args = ["--prompts", str(given), "--base-model", str(base), "--adapter", str(adapter)]
        args += ["--output", str(output), "--dtype", "float32", "--what", f"rank {name}"]
        metadata, messages = launched("rankings", [*command, *args], env)
        processes = 1 if name == "one" else 2
        assert metadata["processes"] == processes and metadata["prompts"] == prompts.height
        assert metadata["dtype_chosen"] == "float32" and metadata["device"] == "cpu"
        assert metadata["scores"] == "LLM"  # the adapter was not trained over the retriever
        done = [m for m in messages if "prompts (100%)" in m]
        assert len(done) == 1, messages[-20:]  # progress from the main process only
        share = prompts.height if processes == 1 else 5  # process 0 ranks the first 5 of 9
        assert f"{share}/{share} prompts" in done[0]
        tables[name] = pl.read_parquet(output)
        assert dict(tables[name].schema) == RANKING_COLUMNS
    for table in tables.values():
        assert table["example_id"].to_list() == prompts["example_id"].to_list()
        assert table["ranked_item_idxs"].to_list() == expected["ranked_item_idxs"].to_list()
        assert table["target_rank"].to_list() == expected["target_rank"].to_list()
        for got, want in zip(table["ranked_scores"], expected["ranked_scores"], strict=True):
            assert got.to_list() == pytest.approx(want.to_list(), abs=1e-5)


def test_the_launch_arguments_make_the_same_job() -> None:
    for job in [
        RankJob(Path("p.parquet"), Path("base"), None, Path("out.parquet")),
        RankJob(Path("p"), Path("b"), Path("a"), Path("o"), 16, "bfloat16", "rankings x|y"),
    ]:
        assert job_from_args(build_parser().parse_args(script_args(job))) == job
