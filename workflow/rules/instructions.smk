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
        flags=augment_flags,
    shell:
        "imatch augment --samples {input.samples} --out {output.table} --images {output.images}"
        " {params.flags} > {log} 2>&1"


rule instructions_train:
    input:
        unpack(instruction_inputs),
    output:
        table=f"{RESULTS}/instructions/{{query}}/train-{{train}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/train-{{train}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/train-{{train}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_train-{{train}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_train-{{train}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        flags=instruction_flags,
    shell:
        "imatch instructions --split train --samples {input.samples} --elements {input.elements}"
        " --out {output.table} --jsonl {output.jsonl} {params.flags} > {log} 2>&1"


rule instructions_eval:
    input:
        unpack(instruction_inputs),
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
        flags=instruction_flags,
    shell:
        "imatch instructions --split {wildcards.split} --samples {input.samples} --elements {input.elements}"
        " --out {output.table} --jsonl {output.jsonl} {params.flags} > {log} 2>&1"


rule instructions_eval_levels:
    input:
        unpack(instruction_inputs),
    output:
        table=f"{RESULTS}/instructions/{{query}}/{{split}}.levels-{{levels}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/{{split}}.levels-{{levels}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/{{split}}.levels-{{levels}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_{{split}}.levels-{{levels}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_{{split}}.levels-{{levels}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        flags=instruction_flags,
    shell:
        "imatch instructions --split {wildcards.split} --samples {input.samples} --elements {input.elements}"
        " --out {output.table} --jsonl {output.jsonl} {params.flags} > {log} 2>&1"


rule instructions_pseudo:
    input:
        unpack(pseudo_inputs),
    output:
        table=f"{RESULTS}/instructions/{{query}}/val.pseudo-{{round}}.parquet",
        jsonl=f"{RESULTS}/instructions/{{query}}/val.pseudo-{{round}}.jsonl",
        record=f"{RESULTS}/instructions/{{query}}/val.pseudo-{{round}}.parquet.json",
    log:
        f"{RESULTS}/logs/instructions/{{query}}_val.pseudo-{{round}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/instructions/{{query}}_val.pseudo-{{round}}.tsv"
    conda:
        "../../envs/imatch.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        flags=pseudo_flags,
    shell:
        "imatch instructions --split val --samples {input.samples} --elements {input.elements}"
        " --out {output.table} --jsonl {output.jsonl} {params.flags} > {log} 2>&1"
