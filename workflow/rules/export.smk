# The submitted ensemble as a portable bundle (imatch export): what `imatch score` and
# `imatch.Scorer` read on another machine.


rule export:
    input:
        predictions=lambda w: PLAN.exported_predictions(),
        code=code("bundle"),
    output:
        directory(f"{RESULTS}/bundle"),
    log:
        f"{RESULTS}/logs/export.log",
    benchmark:
        f"{RESULTS}/benchmarks/export.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        results=lambda w, output: os.path.dirname(output[0]),  # the results folder
        predictor=config["submission"]["predictor"],
        split=config["submission"]["split"],
    shell:
        "imatch export {params.results} --out {output} --predictor {params.predictor} --split {params.split}"
        " > {log} 2>&1"
