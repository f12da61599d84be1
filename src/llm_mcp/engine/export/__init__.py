"""Writing a trained model out: the adapter, the merged model, GGUF (llama.cpp) and an Ollama Modelfile, each verified."""
