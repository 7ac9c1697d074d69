# Instruction sets of both tasks (paper Sec. 3.1-3.3) and the augmented training images.


rule augment_images:
    input:
        samples=rules.ingest.output.samples,
        code=code("augment"),
    output:
        table=f"{RESULTS}/augment/{{aug}}/augmented.parquet",
        images=directory(f"{RESULTS}/augment/{{aug}}/images"),
    log:
        f"{RESULTS}/logs/augment/{{aug}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/augment/{{aug}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        flags=lambda w: PLAN.augment_flags(w.aug),
    shell:
        "imatch augment --samples {input.samples} --out {output.table} --images {output.images}"
        " {params.flags} > {log} 2>&1"


# One rule writes every instruction set; the variants below differ in the set they name (a
# training set with its augmentation, an evaluation set with predicted element levels, the
# pseudo-labelled val set of a round) and in what they read.
rule instructions_eval:
    input:
        unpack(lambda w: {**PLAN.instruction_inputs(w), "code": code("instructions")}),
    output:
        table=f"{RESULTS}/instructions/{{query}}/{{split}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/{{split}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/{{split}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_{{split}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        split=lambda w: w.split,
        flags=lambda w, input: PLAN.instruction_flags(w, input),
    shell:
        "imatch instructions --split {params.split} --samples {input.samples} --elements {input.elements}"
        " --out {output.table} --jsonl {output.jsonl} {params.flags} > {log} 2>&1"


use rule instructions_eval as instructions_train with:
    output:
        table=f"{RESULTS}/instructions/{{query}}/train-{{train}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/train-{{train}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/train-{{train}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_train-{{train}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_train-{{train}}.tsv"
    params:
        split="train",
        flags=lambda w, input: PLAN.instruction_flags(w, input),


use rule instructions_eval as instructions_eval_levels with:
    output:
        table=f"{RESULTS}/instructions/{{query}}/{{split}}.levels-{{levels}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/{{split}}.levels-{{levels}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/{{split}}.levels-{{levels}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_{{split}}.levels-{{levels}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_{{split}}.levels-{{levels}}.tsv"


use rule instructions_eval as instructions_pseudo with:
    input:
        unpack(lambda w: {**PLAN.pseudo_inputs(w), "code": code("instructions")}),
    output:
        table=f"{RESULTS}/instructions/{{query}}/val.pseudo-{{round}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/val.pseudo-{{round}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/val.pseudo-{{round}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_val.pseudo-{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_val.pseudo-{{round}}.tsv"
    params:
        split="val",
        flags=lambda w, input: PLAN.pseudo_flags(w, input),
