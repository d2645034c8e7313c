"""Run what was written: backends behind one interface (torch now; onnxruntime
and llama.cpp to come) and the measurements made with them (perplexity).
Validators never re-run compression."""
