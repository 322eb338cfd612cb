"""Methods opdcore adds to vLLM's workers (LLM(worker_extension_cls=...)), so collective_rpc calls them by name in
an engine core in this process or in another one (no pickled callables)."""
from __future__ import annotations


class WeightSyncExtension:
    def refresh_tied_lm_head(self) -> bool:
        """After an in-place reload, redo the post-load processing of an LM head tied to the input embedding.

        The reload processes the layers whose weights it loaded; a tied head loads none (its weight is the
        embedding's), so on the CPU backend its prepacked GEMM weight (built from the embedding at start-up) would
        keep the old values and every logit would come from the old head. Idempotent (it only re-dispatches)."""
        model = self.model_runner.model
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or getattr(head, "weight", None) is None or \
                head.weight.data_ptr() != embed.weight.data_ptr():
            return False
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)
        return True
