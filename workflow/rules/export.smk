# The submitted ensemble as a portable bundle (imatch export): what `imatch score` and
# `imatch.Scorer` read on another machine.


def exported_predictions(wildcards):
    sub = config["submission"]
    return (
        f"{RESULTS}/predictions/{sub['predictor']}/{sub['split']}/predictions.parquet"
    )


rule export:
    input:
        predictions=exported_predictions,
        code=code("bundle"),
    output:
        directory(f"{RESULTS}/bundle"),
    log:
        f"{RESULTS}/logs/export.log",
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        predictor=config["submission"]["predictor"],
        split=config["submission"]["split"],
    shell:
        "imatch export {RESULTS} --out {output} --predictor {params.predictor} --split {params.split}"
        " > {log} 2>&1"
