"""famjax.evaluation: PassKey, long-context and GPT-3 evaluation of famjax models on the streaming path.

Owns: reading long texts through `Transformer.init_state` + `Transformer.stream` in chunks (constant
memory in bswa/fam, so a 1M-token PassKey runs in the memory of one chunk), greedy decoding, the
log-likelihood of given continuations (rank classification), scoring with the tasks' own metrics,
loading models for the command lines (famjax workdirs and Hugging Face directories), progress lines,
and the reports (JSON, markdown, PNG).

  passkey      evaluate_passkey: the examples of the passkey_* tasks, streamed, exact match
  recall       evaluate_recall: the multikey_* and mqar_* tasks (famjax.data.recall), streamed, exact
               match per question
  longcontext  load_tasks / evaluate_task: any famjax seqio task (scrolls_*, xlsum, pg19, isabelle,
               the GPT-3 suite gpt3_rank / gpt3_gen, ...)
  rank         option_log_likelihoods: the options of a rank classification example, scored
  stream       read_prompt, greedy_continue, next_token_argmax, continuation_log_probs: the streaming
               primitives
  load         ModelSource, describe, load: a workdir or an HF directory -> Transformer
  lengths      "1k,2k,...,1m" -> token counts
  progress     Progress: tokens done / total, tok/s and ETA on stderr
  report       results.json, results.md, passkey.png
  runner       several models x PassKey lengths x recall tasks x tasks: famjax.eval's body

Examples, vocabularies and metrics come from famjax.data (which imports TensorFlow); nothing here
imports TensorFlow itself. The submodules are not imported by this file, so `famjax.evaluation.report`
or `.lengths` cost no TensorFlow import. Command lines: famjax/eval.py, famjax/generate.py.
"""
