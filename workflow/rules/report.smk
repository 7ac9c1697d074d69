# Figures of the Snakemake report: predicted vs true, element accuracy by category, training curves.


rule plot_scatter:
    input:
        samples=rules.ingest.output.samples,
        predictions=lambda w: PLAN.predictions(w.split),
        code=code("plots"),
    output:
        report(
            f"{RESULTS}/report/scatter_{{split}}.png",
            caption="../report/scatter.rst",
            category="Predictions",
            subcategory="{split}",
        ),
    log:
        f"{RESULTS}/logs/report/scatter_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/scatter_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch plots scatter {input.predictions} --samples {input.samples} --split {wildcards.split}"
        " --out {output} > {log} 2>&1"


rule plot_categories:
    input:
        elements=rules.ingest.output.elements,
        predictions=lambda w: PLAN.predictions(w.split, "element_predictions"),
        code=code("plots"),
    output:
        report(
            f"{RESULTS}/report/categories_{{split}}.png",
            caption="../report/categories.rst",
            category="Predictions",
            subcategory="{split}",
        ),
    log:
        f"{RESULTS}/logs/report/categories_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/categories_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch plots categories {input.predictions} --elements {input.elements} --split {wildcards.split}"
        " --out {output} > {log} 2>&1"


rule plot_curves:
    input:
        records=lambda w: PLAN.training_records(),
        code=code("plots"),
    output:
        report(
            f"{RESULTS}/report/training_curves.png",
            caption="../report/curves.rst",
            category="Training",
        ),
    log:
        f"{RESULTS}/logs/report/training_curves.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/training_curves.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "imatch plots curves {input.records} --out {output} > {log} 2>&1"
