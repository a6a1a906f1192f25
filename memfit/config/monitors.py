"""The monitor sections: DeepSpeed's `tensorboard`, `wandb` and `csv_monitor` (same keys, same
defaults) and memfit's JSONL monitor (`"memfit": {"jsonl_monitor": ...}`); see memfit/monitor."""

from pydantic import Field

from memfit.config.models import Section
from memfit.config.values import Boolean, Text

DEEPSPEED_JOB_NAME = "DeepSpeedJobName"


class TensorboardConfig(Section):
    enabled: Boolean = Field(False, description="Write TensorBoard events (needs the tensorboard package).")
    output_path: Text() = Field("", description="Directory the job's folder goes in; events in output_path/job_name.")
    job_name: Text() = Field(DEEPSPEED_JOB_NAME, description="The job's folder under output_path.")


class WandbConfig(Section):
    enabled: Boolean = Field(
        False, description="Log to Weights & Biases (needs the wandb package; WANDB_MODE=offline writes locally)."
    )
    group: Text(optional=True) = Field(None, description="W&B run group.")
    team: Text(optional=True) = Field(None, description="W&B entity (team or user).")
    project: Text() = Field("deepspeed", description="W&B project.")


class CsvMonitorConfig(Section):
    enabled: Boolean = Field(False, description="Write one CSV file per event, as DeepSpeed's csv_monitor.")
    output_path: Text() = Field("", description="Directory the job's folder goes in; files in output_path/job_name.")
    job_name: Text() = Field(DEEPSPEED_JOB_NAME, description="The job's folder under output_path.")


class JsonlMonitorConfig(Section):
    enabled: Boolean = Field(False, description="Write one JSON line per optimizer step.")
    path: Text() = Field("metrics.jsonl", description="The JSONL file.")
