# Backbones, fine-tuning with ms-swift and closed-set (QAlign) scoring.


localrules:
    backbone_download,  # needs the internet


rule backbone_tiny:
    input:
        code=code("backbone"),
        arch=arch_code,
    output:
        directory(f"{RESULTS}/backbones/{{backbone}}"),
    log:
        f"{RESULTS}/logs/backbones/{{backbone}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbones/{{backbone}}.tsv"
    wildcard_constraints:
        backbone="|".join(map(re.escape, PLAN.backbones_from("tiny"))) or "(?!)",
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        arch=backbone_value("arch"),
        size=backbone_value("size"),
        seed=backbone_value("seed"),
    shell:
        "imatch tiny-backbone --arch {params.arch} --size {params.size} --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule backbone_pretrained:
    input:
        packed=lambda w: PLAN.pretrained_file(w.backbone),
        code=code("backbone"),
    output:
        directory(f"{RESULTS}/backbones/{{backbone}}"),
    log:
        f"{RESULTS}/logs/backbones/{{backbone}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbones/{{backbone}}.tsv"
    wildcard_constraints:
        backbone="|".join(map(re.escape, PLAN.backbones_from("pretrained"))) or "(?!)",
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch pretrained-backbone --packed {input.packed} --out {output} > {log} 2>&1"


rule backbone_download:
    input:
        code=code("backbone"),
    output:
        "resources/backbones/{backbone}/manifest.json",
    log:
        f"{RESULTS}/logs/backbones/{{backbone}}_download.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbones/{{backbone}}_download.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=4000,
        runtime=600,
    params:
        out=output_dir,
        repo=backbone_value("checkpoint"),
        revision=backbone_value("revision"),
    shell:
        "imatch download-backbone --repo-id {params.repo} --revision {params.revision}"
        " --out {params.out} > {log} 2>&1"


rule backbone_convert_ovis2:
    input:
        manifest="resources/backbones/{backbone}/manifest.json",
        code=code("archs.ovis2_convert"),
    output:
        directory("resources/backbones/{backbone}-native"),
    log:
        f"{RESULTS}/logs/backbones/{{backbone}}_convert.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbones/{{backbone}}_convert.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=160000,
        runtime=120,
    params:
        src=input_dir,
    shell:
        "imatch convert-ovis2 --src {params.src} --out {output} > {log} 2>&1"


rule train:
    input:
        backbone=lambda w: PLAN.backbone_input(w.backbone),
        datasets=lambda w: PLAN.training_sets(w.task, w.round),
        code=code("train"),
        arch=arch_code,
    output:
        directory(f"{RESULTS}/models/{{backbone}}/{{task}}-{{round}}"),
    log:
        f"{RESULTS}/logs/train/{{backbone}}_{{task}}-{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{backbone}}_{{task}}-{{round}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    threads: config["resources"]["threads"]
    resources:
        gpu=lambda w: PLAN.gpus(w.backbone),
        cpus_per_gpu=lambda w, threads: PLAN.cpus_per_gpu(w.backbone, threads),
        mem_mb=lambda w, attempt: config["resources"]["train_mem_mb"] * attempt,
        runtime=lambda w, attempt: config["resources"]["train_runtime"] * attempt,
    params:
        arch=backbone_value("arch"),
        base=lambda w: PLAN.backbone_dir(w.backbone),
        scratch=lambda w: f"{RESULTS}/scratch/{w.backbone}/{w.task}-{w.round}",
        recipe=lambda w: PLAN.recipe_flags(w.backbone),
    shell:
        "imatch train --arch {params.arch} --model {params.base} --dataset {input.datasets}"
        " --out {output} --scratch {params.scratch} {params.recipe} --gpus {resources.gpu} --threads {threads} > {log} 2>&1"


rule score:
    input:
        unpack(
            lambda w: scoring_job_inputs(
                w,
                f"{RESULTS}/models/{w.backbone}/{w.task}-{w.round}",
                PLAN.scoring_sets(w.task, w.round),
            )
        ),
    output:
        f"{RESULTS}/scores/{{backbone}}/{{task}}-{{round}}/shards/{{shard}}.parquet",
    log:
        f"{RESULTS}/logs/score/{{backbone}}_{{task}}-{{round}}.{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/score/{{backbone}}_{{task}}-{{round}}.{{shard}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    threads: config["resources"]["threads"]
    resources:
        gpu=lambda w: PLAN.gpus(w.backbone),
        cpus_per_gpu=lambda w, threads: PLAN.cpus_per_gpu(w.backbone, threads),
        mem_mb=lambda w, attempt: config["resources"]["score_mem_mb"] * attempt,
        runtime=lambda w, attempt: config["resources"]["score_runtime"] * attempt,
    params:
        arch=backbone_value("arch"),
        base=lambda w: PLAN.backbone_dir(w.backbone),
        flags=lambda w: PLAN.score_flags(w.backbone),
        sets=lambda w, input: PLAN.set_options(input),
        shards=config["score"]["shards"],
    shell:
        "imatch score-set --arch {params.arch} --model {input.model} --base {params.base} {params.sets}"
        " --out {output} {params.flags} --gpus {resources.gpu} --threads {threads}"
        " --shard {wildcards.shard} --shards {params.shards} > {log} 2>&1"


rule gather_scores:
    input:
        unpack(
            lambda w: gather_job_inputs(
                f"{RESULTS}/scores/{w.backbone}/{w.task}-{w.round}",
                PLAN.scoring_sets(w.task, w.round),
            )
        ),
    output:
        f"{RESULTS}/scores/{{backbone}}/{{task}}-{{round}}/scores.parquet",
    log:
        f"{RESULTS}/logs/score/{{backbone}}_{{task}}-{{round}}.gather.log",
    benchmark:
        f"{RESULTS}/benchmarks/score/{{backbone}}_{{task}}-{{round}}.gather.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        sets=lambda w, input: PLAN.set_options(input),
    shell:
        "imatch gather-scores {input.shards} {params.sets} --out {output} > {log} 2>&1"


rule element_levels:
    input:
        scores=lambda w: PLAN.element_level_scores(w.levels),
        code=code("ensemble"),
    output:
        f"{RESULTS}/element_levels/{{levels}}.parquet",
    log:
        f"{RESULTS}/logs/element_levels/{{levels}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/element_levels/{{levels}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        view=lambda w: "blank" if w.levels.endswith("-blank") else "seen",
    shell:
        "imatch element-levels --view {params.view} --out {output} {input.scores} > {log} 2>&1"


rule model_predictions:
    input:
        unpack(
            lambda w: {
                **PLAN.predictor_inputs(w.model_predictor, w.split),
                "code": code("ensemble"),
            }
        ),
    output:
        predictions=f"{RESULTS}/predictions/{{model_predictor}}/{{split}}/predictions.parquet",
        elements=f"{RESULTS}/predictions/{{model_predictor}}/{{split}}/element_predictions.parquet",
    log:
        f"{RESULTS}/logs/predictions/{{model_predictor}}_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predictions/{{model_predictor}}_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        tau=config["score"]["tau"],
        view=lambda w: "blank" if PLAN.model_predictor(w.model_predictor)[3] else "seen",
        weights=lambda w, input: (
            f"--weights {input.weights}" if "weights" in input.keys() else ""
        ),
    shell:
        "imatch combine --overall {input.overall} --element {input.element} --split {wildcards.split}"
        " --view {params.view} --tau {params.tau} {params.weights}"
        " --out-predictions {output.predictions} --out-element-predictions {output.elements} > {log} 2>&1"


rule ensemble_weights:
    input:
        unpack(
            lambda w: {
                **PLAN.weight_inputs(w.round),
                "samples": rules.ingest.output.samples,
                "elements": rules.ingest.output.elements,
                "code": code("ensemble"),
            }
        ),
    output:
        f"{RESULTS}/ensemble/{{round}}/weights.json",
    log:
        f"{RESULTS}/logs/ensemble_weights_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ensemble_weights_{{round}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch ensemble-weights --overall {input.overall} --element {input.element} --split holdout"
        " --samples {input.samples} --elements {input.elements} --out {output} > {log} 2>&1"


rule pseudo_labels:
    input:
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        predictions=f"{RESULTS}/predictions/ensemble-{{round}}/val/predictions.parquet",
        element_predictions=f"{RESULTS}/predictions/ensemble-{{round}}/val/element_predictions.parquet",
        code=code("pseudo"),
    output:
        samples=f"{RESULTS}/pseudo/{{round}}/samples.parquet",
        elements=f"{RESULTS}/pseudo/{{round}}/elements.parquet",
    log:
        f"{RESULTS}/logs/pseudo_labels_{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pseudo_labels_{{round}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch pseudo-labels --samples {input.samples} --elements {input.elements}"
        " --predictions {input.predictions} --element-predictions {input.element_predictions}"
        " --out-samples {output.samples} --out-elements {output.elements} > {log} 2>&1"
