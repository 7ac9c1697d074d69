# Predictors that need no training: the floor trained models are compared against.


rule baseline_prior:
    input:
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        code=code("baseline"),
    output:
        predictions=f"{RESULTS}/predictions/prior/{{split}}/predictions.parquet",
        elements=f"{RESULTS}/predictions/prior/{{split}}/element_predictions.parquet",
    log:
        f"{RESULTS}/logs/baseline_prior/{{split}}.log",
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch baseline --samples {input.samples} --elements {input.elements} --split {wildcards.split}"
        " --out-predictions {output.predictions} --out-element-predictions {output.elements} > {log} 2>&1"
