# Predictors that need no training: the floor trained models are compared against.


rule baseline:
    input:
        samples=rules.ingest.output.samples,
        elements=rules.ingest.output.elements,
        code=code("baseline"),
    output:
        predictions=f"{RESULTS}/predictions/{{baseline}}/{{split}}/predictions.parquet",
        elements=f"{RESULTS}/predictions/{{baseline}}/{{split}}/element_predictions.parquet",
    log:
        f"{RESULTS}/logs/baseline/{{baseline}}_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/baseline/{{baseline}}_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch baseline --predictor {wildcards.baseline} --samples {input.samples} --elements {input.elements}"
        " --split {wildcards.split}"
        " --out-predictions {output.predictions} --out-element-predictions {output.elements} > {log} 2>&1"
