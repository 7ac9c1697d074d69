# iMatch (NTIRE 2025 T2I quality assessment, Track 1) as a Snakemake workflow.
# Stages live in workflow/rules/, their code in the `imatch` package (workflow/imatch/).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/instructions.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/ablation.smk"


rule all:
    default_target: True
    input:
        all_targets(),
