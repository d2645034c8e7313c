"""What factorport knows of llama.cpp, in one package: the GGUF tensor names
it gives a model family's weights (`names`, from the family's entry in
`architectures`), the hyper-parameter keys its graphs read (`hparams`), and
its file types and quantizer (`quantize`). The converter step, the GGUF
format and the benchmarks all ask here.
"""
