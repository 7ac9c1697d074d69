# Ablation rows (paper Tables 4 and 5): every backbone trained on each row's instruction variant,
# through the same train / score / gather rules, then one table per task.
use rule train as ablation_train with:
    input:
        backbone=lambda w: PLAN.backbone_input(w.backbone),
        datasets=lambda w: PLAN.ablation_sets(w.variant, w.round),
        code=code("train"),
        arch=arch_code,
    output:
        directory(f"{RESULTS}/ablation/models/{{backbone}}/{{variant}}-{{round}}"),
    log:
        f"{RESULTS}/logs/ablation/train/{{backbone}}_{{variant}}-{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablation/train/{{backbone}}_{{variant}}-{{round}}.tsv"
    params:
        arch=backbone_value("arch"),
        base=lambda w: PLAN.backbone_dir(w.backbone),
        scratch=lambda w: f"{RESULTS}/ablation/scratch/{w.backbone}/{w.variant}-{w.round}",
        recipe=lambda w: PLAN.ablation_recipe_flags(w.backbone, w.variant),


use rule score as ablation_score with:
    input:
        unpack(
            lambda w: scoring_job_inputs(
                w,
                f"{RESULTS}/ablation/models/{w.backbone}/{w.variant}-{w.round}",
                PLAN.ablation_scoring_sets(w.variant, w.round),
            )
        ),
    output:
        f"{RESULTS}/ablation/scores/{{backbone}}/{{variant}}-{{round}}/shards/{{shard}}.parquet",
    log:
        f"{RESULTS}/logs/ablation/score/{{backbone}}_{{variant}}-{{round}}.{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablation/score/{{backbone}}_{{variant}}-{{round}}.{{shard}}.tsv"


use rule gather_scores as ablation_gather_scores with:
    input:
        unpack(
            lambda w: gather_job_inputs(
                f"{RESULTS}/ablation/scores/{w.backbone}/{w.variant}-{w.round}",
                PLAN.ablation_scoring_sets(w.variant, w.round),
            )
        ),
    output:
        f"{RESULTS}/ablation/scores/{{backbone}}/{{variant}}-{{round}}/scores.parquet",
    log:
        f"{RESULTS}/logs/ablation/score/{{backbone}}_{{variant}}-{{round}}.gather.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablation/score/{{backbone}}_{{variant}}-{{round}}.gather.tsv"


rule ablation_table:
    input:
        scores=lambda w: [cell["scores"] for cell in PLAN.ablation_cells(w.task)],
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        code=code("ablation"),
    output:
        table=report(
            f"{RESULTS}/ablation/table_{{task}}.tsv",
            caption="../report/ablation.rst",
            category="Ablation",
        ),
        effects=report(
            f"{RESULTS}/ablation/effects_{{task}}.tsv",
            caption="../report/ablation_effects.rst",
            category="Ablation",
        ),
    log:
        f"{RESULTS}/logs/ablation/table_{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablation/table_{{task}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        plan=lambda w: json.dumps(PLAN.ablation_cells(w.task)),
        split=ABLATION["split"],
        tau=config["score"]["tau"],
    shell:
        "imatch ablation-table --kind {wildcards.task} --plan {params.plan:q} --samples {input.samples}"
        " --elements {input.elements} --split {params.split} --tau {params.tau} --out {output.table}"
        " --effects {output.effects} > {log} 2>&1"
