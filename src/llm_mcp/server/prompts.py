"""Prompts for the common workflows: each walks an agent through the tools, in order, with the user's arguments
filled in. They name the qloraevolved tools, or the unsloth ones where only that family is served."""

from typing import Annotated, Any

from pydantic import Field


def register(server: Any, family: str) -> None:
    def tool(verb: str) -> str:
        return f"{family}_{verb}"

    @server.prompt(name="finetune-on-my-data", title="Fine-tune a model on my data")
    def finetune_on_my_data(
        model_name: Annotated[str, Field(description="A local model folder, a .gguf file or a hub id.")],
        dataset: Annotated[str, Field(description="A dataset file or folder in the workspace (.jsonl, .csv, ...).")],
        output_dir: Annotated[str, Field(description="Where the run writes checkpoints and the adapter.")]
        = "./my-finetune",
    ) -> str:
        """Check the data and the memory, load, train with progress, try the result, and save it."""
        return (
            f"Fine-tune {model_name!r} on the dataset {dataset!r} with the llm-mcp tools, step by step:\n"
            f"1. inspect_dataset(dataset={dataset!r}): check the format, the problems it lists and how many rows "
            f"max_length would cut; tell me before going on if something looks wrong.\n"
            f"2. estimate_memory(model_name={model_name!r}): if it does not fit, use the change its advice names.\n"
            f"3. {tool('load_model')}(model_name={model_name!r}); then inspect_dataset again with its model_id, to see "
            f"two examples exactly as training will see them.\n"
            f"4. {tool('train')}(model_id=..., train_dataset={dataset!r}, training_config={{'output_dir': "
            f"{output_dir!r}}}); it answers 'running' with a job_id for long runs: poll {tool('training_status')} "
            f"every 30-60 s and report the loss to me as it falls.\n"
            f"5. {tool('generate')} on two or three prompts from the data, with use_adapter=true and false, so I see "
            f"what training changed; {tool('evaluate')} on held-out rows if there are any.\n"
            f"6. Tell me where the adapter is ({output_dir}/final) and ask whether to export it.")

    @server.prompt(name="compare-before-after", title="Compare the model before and after fine-tuning")
    def compare_before_after(
        model_id: Annotated[str, Field(description="A loaded, trained model.")],
        prompt: Annotated[str, Field(description="The prompt to answer with and without the adapter.")],
    ) -> str:
        """Answer one prompt with the base model and with the adapter, side by side."""
        return (
            f"Show me what fine-tuning changed in model {model_id!r}:\n"
            f"1. {tool('generate')}(model_id={model_id!r}, prompt={prompt!r}, use_adapter=false): the base model.\n"
            f"2. {tool('generate')}(model_id={model_id!r}, prompt={prompt!r}, use_adapter=true): the fine-tuned one.\n"
            "Both are greedy (temperature 0), so the difference is the adapter's. Show the two answers side by side "
            "and say in a sentence how they differ.")

    @server.prompt(name="export-for-ollama", title="Export a fine-tuned model for Ollama")
    def export_for_ollama(
        model_id: Annotated[str, Field(description="A loaded, trained model.")],
        output_dir: Annotated[str, Field(description="The export folder (GGUF, Modelfile, merged model).")]
        = "./ollama-export",
        quantization: Annotated[str, Field(description="f16, q8_0 (default, exact) or a k-quant: q4_k_m, q5_k_m, "
                                                       "q6_k.")] = "q8_0",
    ) -> str:
        """Merge, convert to GGUF, check it in llama.cpp, and write the Modelfile."""
        return (
            f"Export model {model_id!r} for Ollama:\n"
            f"1. {tool('export')}(model_id={model_id!r}, format='gguf', output_dir={output_dir!r}, "
            f"gguf_quantization={quantization!r}, probe_prompt=<a prompt from the training data>).\n"
            "2. Report `verified` and `verified_llama_cpp`: whether llama.cpp's greedy answer matches the merged "
            "model's (q8_0 and f16 should; a k-quant reports its agreement), and every warning.\n"
            f"3. Tell me the two commands to run it: `ollama create my-model -f {output_dir}/Modelfile` and "
            "`ollama run my-model`.")
