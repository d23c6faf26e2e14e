"""Structure of the plan's model (config only): adaptable layers by role, tied parameters counted once."""
import pytest

from kolora_probe_checks.fixtures_structure import html_table

pytestmark = pytest.mark.cpu


def test_adaptable_layers_found(plan, structure_report, evidence):
    """The analyser finds LoRA-adaptable layers (Linear, Conv1D, bnb Linear4bit/8bit) beyond the head."""
    rep = structure_report
    roles = {role: len(ls) for role, ls in rep.by_role().items()}
    evidence("adaptable_layers", roles, note=f"{rep.architecture}, rules: {rep.family}")
    evidence.html("module table", html_table(
        ["name", "kind", "in_features", "out_features", "role", "tied with"],
        [[l.name, l.kind, l.in_features, l.out_features, l.role, ", ".join(l.tied_with)] for l in rep.layers]))
    if rep.fused:
        evidence("fused_params", rep.fused_params, unit="parameters",
                 note="weight tensors target_modules cannot reach (e.g. mixture-of-experts); [lora].target_parameters")
        evidence.html("weight tensors not reachable by target_modules", html_table(
            ["name", "module", "shape", "parameters"],
            [[f.name, f.module_kind, "×".join(map(str, f.shape)), f.numel] for f in rep.fused]))
    evidence.html("suggested target sets", html_table(
        ["set", "target_modules", "layers"], [[s.name, ", ".join(s.targets), s.modules] for s in rep.suggested]))
    body = roles["attention"] + roles["mlp"] + roles["other"]
    assert body > 0, (f"{plan.model.id}: no adaptable layer besides the head/embeddings was found "
                      f"({rep.architecture}); LoRA could only target {[l.name for l in rep.layers]}; "
                      f"fix: use a model with Linear/Conv1D projections")
    assert roles["attention"] > 0, (f"{plan.model.id}: no attention layer recognised among {body} adaptable layers "
                                    f"({rep.architecture}, model_type {rep.model_type!r}); add a rule for it in "
                                    f"kolora_probe/model/structure.py ARCH_RULES")


def test_tied_parameters_counted_once(plan, model_config, structure_model, structure_report, evidence):
    """Shared parameters (e.g. lm_head ↔ wte) exist once in the meta-device model and in the total."""
    from kolora_probe.model.meta import count_parameters
    from kolora_probe.model.structure import ties_word_embeddings

    rep = structure_report
    total, _ = count_parameters(structure_model)
    evidence("total_params", rep.total_params, expected=total)
    evidence("total_params_if_untied", rep.total_params_if_untied)
    evidence("tied_groups", [list(g.names) for g in rep.tied_groups])
    assert rep.total_params == total, (f"structure total {rep.total_params:,} != model.parameters() total {total:,}; "
                                       f"fix the analyser's de-duplication")
    head = next((l for l in rep.layers if l.role == "output_head"), None)
    if ties_word_embeddings(model_config) and head is not None:
        assert head.tied_with, (f"config.tie_word_embeddings=True but {head.name} is not tied to the input "
                                f"embedding on the meta model: counts would be {head.params:,} too high; "
                                f"build the model with kolora_probe.model.meta.build_meta_model")
