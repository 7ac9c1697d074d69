# iMatch (NTIRE 2025 T2I quality assessment, Track 1) as a Snakemake workflow.
# Stages live in workflow/rules/, their code in the `imatch` package (workflow/imatch/).
from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, f"{workflow.basedir}/workflow")
from imatch.config_checks import read_yaml

# a YAML mistake in the default config is named with its file and line (Snakemake's own message
# names neither; files given with --configfile: `imatch check-config FILE`)
read_yaml("config/config.yaml")


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
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        PLAN.all_targets(),
