# Official format and official scoring: ground truth, submission.zip, metrics.


rule ground_truth:
    input:
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        code=code("submission"),
    output:
        f"{RESULTS}/data/ground_truth/{{split}}.json",
    log:
        f"{RESULTS}/logs/ground_truth/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ground_truth/{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch ground-truth --samples {input.samples} --elements {input.elements}"
        " --split {wildcards.split} --out {output} > {log} 2>&1"


rule submission:
    input:
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        predictions=f"{RESULTS}/predictions/{{predictor}}/{{split}}/predictions.parquet",
        element_predictions=f"{RESULTS}/predictions/{{predictor}}/{{split}}/element_predictions.parquet",
        code=code("submission"),
    output:
        f"{RESULTS}/predictions/{{predictor}}/{{split}}/submission.zip",
    log:
        f"{RESULTS}/logs/submission/{{predictor}}_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/submission/{{predictor}}_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        runtime=config["submission"]["runtime_per_image"],
        cpu=config["submission"]["cpu"],
        extra_data=config["submission"]["extra_data"],
        llm=config["submission"]["llm"],
        description=config["submission"]["description"],
    shell:
        "imatch submission --samples {input.samples} --elements {input.elements} --split {wildcards.split}"
        " --predictions {input.predictions} --element-predictions {input.element_predictions} --out {output}"
        " --runtime {params.runtime} --cpu {params.cpu} --extra-data {params.extra_data} --llm {params.llm}"
        " --description {params.description:q} > {log} 2>&1"


rule evaluate:
    input:
        gt=rules.ground_truth.output[0],
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        predictions=lambda w: PLAN.predictions(w.split),
        element_predictions=lambda w: PLAN.predictions(w.split, "element_predictions"),
        code=code("evaluate"),
    output:
        f"{RESULTS}/metrics/{{split}}.json",
    log:
        f"{RESULTS}/logs/evaluate/{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch evaluate-predictors {input.predictions} --gt {input.gt} --samples {input.samples}"
        " --elements {input.elements} --split {wildcards.split} --out {output} > {log} 2>&1"


rule metrics_summary:
    input:
        expand(f"{RESULTS}/metrics/{{split}}.json", split=config["evaluate"]["splits"]),
    output:
        table=report(
            f"{RESULTS}/metrics/summary.tsv",
            caption="../report/metrics.rst",
            category="Metrics",
        ),
        page=report(
            f"{RESULTS}/metrics/summary.html",
            caption="../report/metrics.rst",
            category="Metrics",
        ),
    log:
        f"{RESULTS}/logs/metrics_summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/metrics_summary.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "imatch metrics-table --out {output.table} --html {output.page} {input} > {log} 2>&1"
