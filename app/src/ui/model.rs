//! The Model view: pick a model (hub repo id, local folder, or the built-in demo), a
//! device and a precision; see its summary and the training memory estimate.

use mtp_core::DType;
use mtp_core::decode::DraftArithmetic;
use mtp_core::inspect::human_bytes;
use mtp_core::train::memory::{MemoryInputs, estimate};

use super::{busy_line, form_row};
use crate::app::{Command, Pick};
use crate::state::{Persisted, Runtime};
use crate::worker::Job;

/// Draw the Model view.
pub fn show(
    ui: &mut egui::Ui,
    p: &mut Persisted,
    rt: &Runtime,
    devices: &[mtp_core::DeviceSpec],
    commands: &mut Vec<Command>,
) {
    let busy = rt.busy();
    ui.heading("Model");
    egui::Grid::new("model-form").num_columns(2).spacing([12.0, 8.0]).show(ui, |ui| {
        form_row(ui, "Source", "A hub repo id (owner/name[@revision]), a local folder, or `demo`", |ui| {
            ui.horizontal(|ui| {
                let r = ui.add(egui::TextEdit::singleline(&mut p.model.source).desired_width(320.0));
                if ui.button("Folder…").on_hover_text("Pick a local model folder").clicked() {
                    commands.push(Command::Pick(Pick::ModelFolder));
                }
                if ui.button("Demo").on_hover_text("The built-in demo model").clicked() {
                    p.model.source = "demo".into();
                    commands.push(Command::LoadModel);
                }
                r
            })
            .inner
        });
        form_row(ui, "Device", "Where the model runs", |ui| {
            egui::ComboBox::from_id_salt("device")
                .selected_text(p.model.device.to_string())
                .show_ui(ui, |ui| {
                    for d in devices {
                        // A new device brings its default precision (bf16 on CUDA, f32 on
                        // the CPU); the Precision box still overrides it.
                        if ui.selectable_value(&mut p.model.device, *d, d.to_string()).changed() {
                            p.model.dtype = DType::default_for(*d);
                        }
                    }
                })
                .response
        });
        form_row(ui, "Precision", "Weights and activations (bf16 on a GPU, f32 on the CPU; bf16 on the CPU halves the memory and decodes faster)", |ui| {
            egui::ComboBox::from_id_salt("dtype")
                .selected_text(p.model.dtype.to_string())
                .show_ui(ui, |ui| {
                    for d in [DType::F32, DType::Bf16, DType::F16] {
                        ui.selectable_value(&mut p.model.dtype, d, d.to_string());
                    }
                })
                .response
        });
        let cuda = p.model.device.is_cuda();
        let tip = "Record each decoding step (AR, and greedy speculative steps) as a CUDA graph and replay it \
                   with one launch rather than one launch per operation (CUDA only; on by default; applies at \
                   the next load)";
        form_row(ui, "CUDA graphs", tip, |ui| {
            // Off and disabled on the CPU, where nothing is recorded; the choice is kept for CUDA.
            let mut off = false;
            let value = if cuda { &mut p.model.cuda_graphs } else { &mut off };
            ui.add_enabled(cuda, egui::Checkbox::new(value, "Replay decoding steps"))
        });
        let tip = "How a speculative step multiplies its mask rows, whose outputs are only drafts (greedy output is \
                   the same either way): auto (int8 on a CPU with AVX2, for a model over 64 MiB only in steps of \
                   6 or more mask rows on an AMD CPU before Zen 5, 12 on others), exact (the model's dtype), \
                   bf16 or int8 (CPU only; the draft chain's head and sampler in int8 too); applies at the next load";
        form_row(ui, "Draft arithmetic", tip, |ui| {
            egui::ComboBox::from_id_salt("draft-arithmetic")
                .selected_text(p.model.draft_arithmetic.to_string())
                .show_ui(ui, |ui| {
                    for a in DraftArithmetic::ALL {
                        ui.selectable_value(&mut p.model.draft_arithmetic, a, a.to_string());
                    }
                })
                .response
        });
        let tip = "Variables the chat template reads besides the conversation, one KEY=VALUE a line, as \
                   transformers' apply_chat_template keyword arguments: enable_thinking=false (Qwen3), \
                   date_string=26 Jul 2024 (Llama 3.x, which otherwise writes today's date); applies at the next \
                   load, and training records them with its recipe";
        form_row(ui, "Template variables", tip, |ui| {
            ui.vertical(|ui| {
                let r = ui.add(
                    egui::TextEdit::multiline(&mut p.model.chat_template_vars)
                        .desired_rows(1)
                        .desired_width(320.0)
                        .hint_text("enable_thinking=false"),
                );
                if let Err(e) = p.model.template_vars() {
                    ui.colored_label(super::theme::BAD, format!("{e:#}"));
                }
                r
            })
            .inner
        });
    });
    ui.horizontal(|ui| {
        if ui
            .add_enabled(!busy, egui::Button::new("Load model"))
            .on_hover_text("Download if needed, then load")
            .clicked()
        {
            commands.push(Command::LoadModel);
        }
        busy_line(ui, rt, Job::LoadModel);
    });

    ui.separator();
    let Some(m) = &rt.model else {
        ui.label("No model loaded.");
        return;
    };
    let i = &m.info;
    egui::Grid::new("model-summary").num_columns(2).striped(true).show(ui, |ui| {
        let rows = [
            (
                "Source",
                match &m.source {
                    mtp_core::ModelSource::Local { path } => super::path_text(rt, path),
                    other => other.to_string(),
                },
            ),
            ("Folder", super::path_text(rt, &m.dir)),
            ("Family", i.model_type.clone()),
            ("Parameters", format!("{} ({:.2} M)", i.num_parameters, i.num_parameters as f64 / 1e6)),
            ("Width × layers", format!("{} × {}", i.hidden_size, i.num_layers)),
            ("Heads", format!("{} query / {} key-value", i.num_heads, i.num_kv_heads)),
            ("Vocabulary", i.vocab_size.to_string()),
            ("Context", i.context_length.to_string()),
            ("Stored as", format!("{} ({})", i.stored_dtype, human_bytes(i.stored_bytes))),
            ("Running on", format!("{} in {}", m.device, m.dtype)),
            (
                "Chat template",
                match (m.chat_template, m.tokenizer.template_vars()) {
                    (false, _) => "no".into(),
                    (true, vars) if vars.is_empty() => "yes".into(),
                    (true, vars) => format!("yes, with {}", mtp_core::tokenizer::describe_template_vars(vars)),
                },
            ),
            ("Loaded in", super::timing(rt, format!("{:.2} s", m.load_seconds))),
        ];
        for (k, v) in rows {
            ui.strong(k);
            ui.label(v);
            ui.end_row();
        }
    });

    ui.separator();
    ui.heading("Adapter");
    ui.horizontal(|ui| {
        match &rt.adapter {
            Some(a) => ui.label(format!(
                "{} — k = {}, rank {}, sampler {}, {}",
                super::path_text(rt, &a.path),
                a.config.k,
                a.config.lora.rank,
                if a.config.sampler { "on" } else { "off" },
                if a.config.gated { "gated" } else { "plain LoRA" }
            )),
            None => ui.label("none loaded (train one, or pick a file)"),
        };
    });
    ui.horizontal(|ui| {
        super::named(
            ui.add(
                egui::TextEdit::singleline(&mut p.model.adapter).hint_text("adapter.safetensors").desired_width(320.0),
            ),
            egui::Role::TextInput,
            "Adapter file",
        );
        if ui.button("File…").on_hover_text("Pick an adapter.safetensors").clicked() {
            commands.push(Command::Pick(Pick::AdapterFile));
        }
        if ui.add_enabled(!busy && !p.model.adapter.trim().is_empty(), egui::Button::new("Load adapter")).clicked() {
            commands.push(Command::LoadAdapter);
        }
        busy_line(ui, rt, Job::LoadAdapter);
    });

    ui.separator();
    ui.heading("Training memory estimate");
    let t = &p.train.recipe;
    let inputs = MemoryInputs {
        k: t.method.k,
        lora: &t.method.lora,
        sampler: t.method.sampler,
        batch_size: t.training.batch_size,
        seq_len: t.training.seq_len,
        dtype: m.dtype,
        checkpointing: false,
        device: m.device,
    };
    let e = estimate(i, &m.config, &inputs);
    let c = estimate(i, &m.config, &MemoryInputs { checkpointing: true, ..inputs.clone() });
    ui.label(format!(
        "k = {}, rank {}, batch {}, sequence {} tokens, {} (change these in the Train tab):",
        t.method.k, t.method.lora.rank, t.training.batch_size, t.training.seq_len, m.dtype
    ));
    egui::Grid::new("memory").num_columns(3).striped(true).show(ui, |ui| {
        ui.label("");
        ui.strong("as is");
        ui.strong("with checkpointing");
        ui.end_row();
        for (k, v, w) in [
            ("Frozen weights", e.weights, c.weights),
            ("Trainable + grads + AdamW", e.trainable, c.trainable),
            ("Activations", e.activations, c.activations),
            ("Logits", e.logits, c.logits),
            ("Runtime", e.runtime, c.runtime),
            ("Total", e.total(), c.total()),
        ] {
            ui.strong(k);
            ui.label(human_bytes(v));
            ui.label(human_bytes(w));
            ui.end_row();
        }
    });
    ui.weak(
        "Activation checkpointing keeps only each layer's input and recomputes the layer in the backward \
         pass; Train's `auto` turns it on when the estimate exceeds the device's memory.",
    );
}
