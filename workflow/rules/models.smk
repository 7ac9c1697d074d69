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


rule backbone_download:
    input:
        code=code("backbone"),
    output:
        "resources/backbones/{backbone}/manifest.json",
    log:
        f"{RESULTS}/logs/backbones/{{backbone}}_download.log",
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
        backbone=backbone_input,
        dataset=training_set,
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
    threads: 2
    resources:
        gpu=gpus(),
        mem_mb=lambda w, attempt: config["resources"]["train_mem_mb"] * attempt,
        runtime=lambda w, attempt: config["resources"]["train_runtime"] * attempt,
    params:
        arch=backbone_value("arch"),
        base=backbone_folder,
        scratch=scratch_dir,
        recipe=recipe_flags,
    shell:
        "imatch train --arch {params.arch} --model {params.base} --dataset {input.dataset}"
        " --out {output} --scratch {params.scratch} {params.recipe} --gpus {resources.gpu} > {log} 2>&1"


rule score:
    input:
        model=f"{RESULTS}/models/{{backbone}}/{{task}}-{{round}}",
        instructions=scoring_set,
        backbone=backbone_input,
        code=code("score"),
        arch=arch_code,
    output:
        f"{RESULTS}/scores/{{backbone}}/{{task}}-{{round}}/{{split}}.parquet",
    log:
        f"{RESULTS}/logs/score/{{backbone}}_{{task}}-{{round}}_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/score/{{backbone}}_{{task}}-{{round}}_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    threads: 2
    resources:
        gpu=gpus(),
        mem_mb=lambda w, attempt: config["resources"]["score_mem_mb"] * attempt,
        runtime=lambda w, attempt: config["resources"]["score_runtime"] * attempt,
    params:
        arch=backbone_value("arch"),
        base=backbone_folder,
        flags=score_flags,
    shell:
        "imatch score-set --arch {params.arch} --model {input.model} --base {params.base}"
        " --instructions {input.instructions} --out {output} {params.flags} --gpus {resources.gpu} > {log} 2>&1"


rule element_levels:
    input:
        scores=element_level_scores,
        code=code("ensemble"),
    output:
        f"{RESULTS}/element_levels/{{round}}/{{split}}.parquet",
    log:
        f"{RESULTS}/logs/element_levels/{{round}}_{{split}}.log",
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch element-levels --out {output} {input.scores} > {log} 2>&1"


rule model_predictions:
    input:
        overall=f"{RESULTS}/scores/{{backbone}}/overall-{ROUND}/{{split}}.parquet",
        element=f"{RESULTS}/scores/{{backbone}}/element-{ROUND}/{{split}}.parquet",
        code=code("ensemble"),
    output:
        predictions=f"{RESULTS}/predictions/{{backbone}}/{{split}}/predictions.parquet",
        elements=f"{RESULTS}/predictions/{{backbone}}/{{split}}/element_predictions.parquet",
    log:
        f"{RESULTS}/logs/predictions/{{backbone}}_{{split}}.log",
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        tau=tau_of,
    shell:
        "imatch combine --overall {input.overall} --element {input.element} --tau {params.tau}"
        " --out-predictions {output.predictions} --out-element-predictions {output.elements} > {log} 2>&1"
