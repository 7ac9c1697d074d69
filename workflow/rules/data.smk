# Getting the data: generate the demo set or download EvalMuse-40K, then ingest it.


localrules:
    download,  # compute nodes of most clusters have no internet


rule demo_data:
    input:
        code=code("demo_data"),
    output:
        directory(f"{RESULTS}/demo/source"),
    log:
        f"{RESULTS}/logs/demo_data.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_data.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        seed=config["demo"]["seed"],
        train=config["demo"]["train_prompts"],
        val=config["demo"]["val_prompts"],
        test=config["demo"]["test_prompts"],
        size=config["demo"]["image_size"],
        layout=config["demo"]["layout"],
        parts=config["demo"]["parts"],
    shell:
        "imatch demo-data --out {output} --seed {params.seed} --train-prompts {params.train}"
        " --val-prompts {params.val} --test-prompts {params.test} --image-size {params.size}"
        " --layout {params.layout} --parts {params.parts} > {log} 2>&1"


rule download:
    input:
        code=code("download"),
    output:
        f"{config['hub']['dir']}/manifest.json",
    log:
        f"{RESULTS}/logs/download.log",
    benchmark:
        f"{RESULTS}/benchmarks/download.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=4000,
        runtime=600,
    params:
        out=output_dir,
        repo=config["hub"]["repo_id"],
        revision=config["hub"]["revision"],
        patterns=" ".join(f"--pattern '{p}'" for p in config["hub"]["patterns"]),
    shell:
        "imatch download --out {params.out} --repo-id {params.repo} --revision {params.revision}"
        " {params.patterns} > {log} 2>&1"


rule ingest:
    input:
        unpack(lambda w: {**PLAN.ingest_inputs(), "code": code("ingest")}),
    output:
        samples=f"{RESULTS}/data/samples.parquet",
        elements=f"{RESULTS}/data/elements.parquet",
        summary=f"{RESULTS}/data/ingest_summary.json",
    log:
        f"{RESULTS}/logs/ingest.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        source=lambda w, input: PLAN.ingest_source(input.source),
        out=output_dir,
        options=lambda w, input: PLAN.ingest_options(input),
        holdout_fraction=config["ingest"]["holdout_fraction"],
        seed=config["ingest"]["seed"],
    shell:
        "imatch ingest --source {params.source} --out {params.out} {params.options}"
        " --holdout-fraction {params.holdout_fraction} --seed {params.seed} > {log} 2>&1"
