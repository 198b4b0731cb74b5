//! The Train view: every option of `mtp train` with defaults and tooltips; Start, Pause,
//! Stop, Resume; live plots of each loss term, per-slot accuracy, validation, learning rate,
//! tokens/s and GPU memory; the project's runs, whose curves can be overlaid.

use egui_plot::{Legend, Line, Plot, PlotPoints};
use mtp_core::model::Proj;
use mtp_core::mtp::loss::LcmReduction;
use mtp_core::mtp::{Recipe, SamplerForm};
use mtp_core::train::trainer::Checkpointing;
use mtp_core::train::{Packing, Schedule, StepMetrics};

use super::{drag_usize, form_row, theme};
use crate::app::Command;
use crate::state::{Persisted, Runtime, Series, TrainForm};
use crate::worker::Job;

/// Draw the Train view.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &mut Runtime, commands: &mut Vec<Command>) {
    ui.heading("Train an MTP adapter");
    // What a run trains on comes from the other tabs: say which.
    let model = rt.model.as_ref().map_or("no model loaded".to_string(), |m| super::path_text(rt, &m.dir));
    ui.weak(format!("Model {model} · data {} (change them in the Model and Data tabs)", p.data.source));
    let training = rt.job == Some(Job::Train);
    // The recipe folds away, to watch a run's curves without scrolling.
    egui::CollapsingHeader::new("Recipe").default_open(true).show(ui, |ui| {
        ui.add_enabled_ui(!training, |ui| form(ui, p));
    });
    ui.horizontal(|ui| {
        let can_start = !rt.busy() && rt.model.is_some();
        if ui
            .add_enabled(can_start, egui::Button::new("Start training"))
            .on_hover_text("Train with these settings on the Data tab's dataset")
            .clicked()
        {
            commands.push(Command::StartTraining);
        }
        let paused = rt.paused;
        if training {
            if ui.button(if paused { "Continue" } else { "Pause" }).on_hover_text("Pause between steps").clicked() {
                commands.push(Command::Pause(!paused));
            }
            if ui.button("Stop").on_hover_text("Stop after this step and save a checkpoint").clicked() {
                commands.push(Command::Cancel);
            }
        }
        if rt.model.is_none() {
            ui.weak("load a model first");
        }
    });
    if let Some(live) = &rt.live {
        progress_line(ui, rt, live, training);
    }
    ui.separator();
    plots(ui, rt);
    ui.separator();
    runs(ui, p, rt, commands);
}

fn form(ui: &mut egui::Ui, p: &mut Persisted) {
    let TrainForm { recipe: r, run_name } = &mut p.train;
    ui.columns(3, |cols| {
        egui::Grid::new("train-method").num_columns(2).show(&mut cols[0], |ui| {
            ui.strong("Method");
            ui.end_row();
            let m = &mut r.method;
            form_row(
                ui,
                "k (masks)",
                "Mask tokens per block: drafts per step. A model trained with k runs with 1..k",
                |ui| ui.add(drag_usize(&mut m.k, 1..=16)),
            );
            form_row(
                ui,
                "LoRA rank",
                "Rank of the gated LoRA on every target projection (paper 128; 16 keeps ~98%)",
                |ui| ui.add(drag_usize(&mut m.lora.rank, 1..=256)),
            );
            form_row(ui, "LoRA alpha", "The LoRA delta is scaled by alpha / rank", |ui| {
                ui.add(egui::DragValue::new(&mut m.lora.alpha).range(0.1..=1024.0))
            });
            form_row(
                ui,
                "Recipe",
                "paper: learned mask embeddings and a sampler head. UNO: mask rows read random token ids, no \
                 sampler; exports as a PEFT LoRA that SGLang and vLLM serve (README, Serving at scale)",
                |ui| {
                    egui::ComboBox::from_id_salt("recipe")
                        .selected_text(m.recipe.to_string())
                        .show_ui(ui, |ui| {
                            for recipe in Recipe::ALL {
                                ui.selectable_value(&mut m.recipe, recipe, recipe.to_string());
                            }
                        })
                        .response
                },
            );
            let uno = m.recipe == Recipe::Uno;
            if uno {
                // UNO has neither: its drafts are the LM head's, its masks random ids.
                m.sampler = false;
                m.train_mask_embeddings = false;
            }
            form_row(ui, "Sampler head", "Drafts conditioned on the previous draft (off: the ablation)", |ui| {
                ui.add_enabled(!uno, egui::Checkbox::without_text(&mut m.sampler))
            });
            form_row(
                ui,
                "Residual sampler",
                "The sampler's output added to the mask's hidden state through a zero-initialised matrix, so it \
                 starts drafting as the LM head does (off: the paper's form, which starts from random drafts)",
                |ui| {
                    let mut residual = m.sampler_form == SamplerForm::Residual;
                    let response = ui.add_enabled(m.sampler, egui::Checkbox::without_text(&mut residual));
                    m.sampler_form = if residual { SamplerForm::Residual } else { SamplerForm::Paper };
                    response
                },
            );
            form_row(
                ui,
                "Gated LoRA",
                "Off = plain LoRA: changes next-token outputs too (the paper's ablation)",
                |ui| ui.checkbox(&mut m.gated, ""),
            );
            form_row(ui, "Train masks", "Also train the k mask embeddings (frozen by default)", |ui| {
                ui.add_enabled(!uno, egui::Checkbox::without_text(&mut m.train_mask_embeddings))
            });
            form_row(
                ui,
                "LCM weight",
                "Weight of the latent-consistency loss, which averages over the hidden width: one weight serves \
                 every model (5, the default, is what the demo's adapter was trained with)",
                |ui| ui.add(egui::DragValue::new(&mut r.lcm_weight).range(0.0..=100.0).speed(0.05)),
            );
            form_row(
                ui,
                "LCM reduction",
                "How the latent-consistency loss reduces over the hidden width: mean (one weight for every \
                 width, the default) or sum (the first reading; its weight depends on the width)",
                |ui| {
                    egui::ComboBox::from_id_salt("lcm-reduction")
                        .selected_text(r.lcm_reduction.to_string())
                        .show_ui(ui, |ui| {
                            for c in [LcmReduction::Mean, LcmReduction::Sum] {
                                ui.selectable_value(&mut r.lcm_reduction, c, c.to_string());
                            }
                        })
                        .response
                },
            );
            ui.label("Targets").on_hover_text("Projections that get gated LoRA");
            ui.horizontal_wrapped(|ui| {
                let targets = &mut r.method.lora.targets;
                for proj in Proj::ALL {
                    let mut on = targets.contains(&proj);
                    if ui.checkbox(&mut on, proj.module().trim_end_matches("_proj")).changed() {
                        targets.retain(|t| *t != proj);
                        if on {
                            targets.push(proj);
                            targets.sort();
                        }
                    }
                }
            });
            ui.end_row();
        });
        egui::Grid::new("train-optim").num_columns(2).show(&mut cols[1], |ui| {
            ui.strong("Optimisation");
            ui.end_row();
            form_row(ui, "Steps", "Optimizer steps in total", |ui| {
                ui.add(drag_usize(&mut r.training.steps, 1..=1_000_000))
            });
            let o = &mut r.training.optim;
            form_row(ui, "Learning rate", "AdamW peak learning rate", |ui| {
                ui.add(
                    egui::DragValue::new(&mut o.lr)
                        .range(1e-6..=1e-1)
                        .speed(1e-5)
                        .custom_formatter(|v, _| format!("{v:.1e}")),
                )
            });
            form_row(ui, "Warmup", "Steps of linear warmup", |ui| ui.add(drag_usize(&mut o.warmup, 0..=100_000)));
            form_row(ui, "Cosine decay", "Decay to 10% after warmup (off: constant, as in the paper)", |ui| {
                let mut cosine = o.schedule == Schedule::Cosine;
                let response = ui.checkbox(&mut cosine, "");
                o.schedule = if cosine { Schedule::Cosine } else { Schedule::Constant };
                response
            });
            form_row(ui, "Grad clip", "Clip the global gradient norm (0 = off)", |ui| {
                ui.add(egui::DragValue::new(&mut o.grad_clip).range(0.0..=100.0).speed(0.05))
            });
            form_row(ui, "Weight decay", "Decoupled (AdamW) weight decay of the trained parameters (0 = off)", |ui| {
                ui.add(egui::DragValue::new(&mut o.weight_decay).range(0.0..=1.0).speed(0.001))
            });
            form_row(ui, "Seed", "Seed of initialisation and data order", |ui| {
                ui.add(egui::DragValue::new(&mut r.training.seed))
            });
            form_row(ui, "Run name", "Folder under the project's runs/ (empty: a timestamp)", |ui| {
                ui.add(egui::TextEdit::singleline(run_name).desired_width(120.0))
            });
        });
        egui::Grid::new("train-data").num_columns(2).show(&mut cols[2], |ui| {
            ui.strong("Batches");
            ui.end_row();
            form_row(ui, "Batch size", "Sequences per micro-batch", |ui| {
                ui.add(drag_usize(&mut r.training.batch_size, 1..=1024))
            });
            form_row(ui, "Grad accumulation", "Micro-batches per optimizer step", |ui| {
                ui.add(drag_usize(&mut r.training.grad_accum, 1..=1024))
            });
            form_row(ui, "Sequence length", "Tokens per training sequence (the layout grows by up to k + 1)", |ui| {
                ui.add(drag_usize(&mut r.training.seq_len, 8..=8192))
            });
            form_row(
                ui,
                "Checkpointing",
                "Activation checkpointing: keep only each layer's input and recompute it in the backward pass \
                 (a fraction of the memory, about a third more compute). auto: on when the Model tab's estimate \
                 exceeds the device's memory",
                |ui| {
                    egui::ComboBox::from_id_salt("checkpointing")
                        .selected_text(r.checkpointing.to_string())
                        .show_ui(ui, |ui| {
                            for c in [Checkpointing::Auto, Checkpointing::On, Checkpointing::Off] {
                                ui.selectable_value(&mut r.checkpointing, c, c.to_string());
                            }
                        })
                        .response
                },
            );
            form_row(
                ui,
                "Draft vocabulary",
                "Stored with the adapter: the most frequent target tokens of the data, which drafting may be \
                 restricted to (0: none; verification always uses the whole vocabulary)",
                |ui| ui.add(drag_usize(&mut r.draft_vocab, 0..=1_000_000)),
            );
            form_row(ui, "Packing", "Concatenate examples (off: one example per sequence, cut at the length)", |ui| {
                let mut pack = r.packing == Packing::Pack;
                let response = ui.checkbox(&mut pack, "");
                r.packing = if pack { Packing::Pack } else { Packing::Truncate };
                response
            });
            form_row(ui, "Validation share", "Share of examples held out", |ui| {
                ui.add(egui::DragValue::new(&mut r.training.val_fraction).range(0.0..=0.5).speed(0.005))
            });
            form_row(ui, "Validate every", "Steps between validation passes", |ui| {
                ui.add(drag_usize(&mut r.training.val_every, 0..=100_000))
            });
            form_row(
                ui,
                "Measure every",
                "Validation passes between measurements of tokens per forward: greedy quadratic decoding of a \
                 few held-out prompts at 1..k masks (0: never; always at the end)",
                |ui| ui.add(drag_usize(&mut r.measure_every, 0..=10_000)),
            );
            form_row(ui, "Checkpoint every", "Steps between checkpoints (also at the end and on stop)", |ui| {
                ui.add(drag_usize(&mut r.training.checkpoint_every, 1..=100_000))
            });
        });
    });
}

fn progress_line(ui: &mut egui::Ui, rt: &Runtime, live: &Series, training: bool) {
    let step = live.train.last().map_or(0, |m| m.step);
    let total = live.total_steps.max(1);
    let eta = seconds_a_step(&live.train).map(|s| s * total.saturating_sub(step) as f64);
    ui.horizontal(|ui| {
        let label = match (training, eta) {
            (true, _) if rt.paused => format!("step {step}/{total} · paused"),
            (true, Some(s)) => format!("step {step}/{total} · ETA {}", super::timing(rt, human_seconds(s))),
            _ => format!("step {step}/{total}"),
        };
        ui.add(egui::ProgressBar::new(step as f32 / total as f32).text(label).desired_width(420.0));
        if let Some(m) = live.train.last() {
            ui.label(format!(
                "loss {:.3} · {} tokens/s",
                m.losses.loss,
                super::timing(rt, format!("{:.0}", m.tokens_per_second))
            ));
        }
        ui.weak(super::path_text(rt, &live.dir));
    });
}

/// The time a step takes now: from the last steps (at most 20) of this session of the run,
/// two at least (one step says nothing about the time between steps). A resumed run's
/// records start with the earlier sessions', whose clock (`elapsed`) started at their own
/// start: a record whose clock reads more than the next one's belongs to an earlier session.
fn seconds_a_step(train: &[StepMetrics]) -> Option<f64> {
    let last = train.last()?;
    let mut first = last;
    let mut steps = 0;
    for m in train.iter().rev().skip(1).take(20) {
        if m.elapsed > first.elapsed || m.step >= first.step {
            break;
        }
        first = m;
        steps += 1;
    }
    (steps > 0).then(|| (last.elapsed - first.elapsed).max(0.0) / (last.step - first.step) as f64)
}

fn human_seconds(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn line(
    name: String,
    data: &[StepMetrics],
    f: impl Fn(&StepMetrics) -> Option<f64>,
    colour: egui::Color32,
) -> Line<'static> {
    let points: PlotPoints = data.iter().filter_map(|m| f(m).map(|y| [m.step as f64, y])).collect();
    Line::new(name, points).color(colour)
}

/// Every series shown: the live run and the overlaid ones, each with the run's folder name.
fn shown_series(rt: &Runtime) -> Vec<(String, Series)> {
    let name = |dir: &std::path::Path| dir.file_name().and_then(|n| n.to_str()).unwrap_or("run").to_owned();
    let mut out = Vec::new();
    if let Some(live) = &rt.live {
        out.push((name(&live.dir), live.clone()));
    }
    for dir in &rt.overlay {
        if rt.live.as_ref().is_some_and(|l| &l.dir == dir) {
            continue;
        }
        if let Some(r) = rt.runs.iter().find(|r| &r.dir == dir) {
            let total_steps = r.config.as_ref().map_or(0, |c| c.training.steps);
            let mut s = Series { dir: r.dir.clone(), total_steps, ..Series::default() };
            for m in &r.metrics {
                s.push(m.clone());
            }
            out.push((name(dir), s));
        }
    }
    out
}

/// One chart of the Train view: a title with what its line styles mean, a plot of `y`
/// against the step, and a small legend in `corner` (where its curves seldom go) whose
/// entries (one per name: a run's lines of one quantity share one) hide and show them.
struct Chart {
    id: &'static str,
    title: &'static str,
    styles: &'static str,
    y: &'static str,
    corner: egui_plot::Corner,
    /// Values the y axis always shows (accuracies 0 to 1, tokens per forward 1 to 2 at least).
    y_shows: &'static [f64],
    /// Tick labels in scientific notation (learning rates).
    scientific: bool,
}

impl Chart {
    const fn new(id: &'static str, title: &'static str, y: &'static str) -> Self {
        Chart { id, title, styles: "", y, corner: egui_plot::Corner::RightTop, y_shows: &[], scientific: false }
    }

    /// Draw it `width` wide, its x axis from step 0 to `last_step` (the run's whole length,
    /// so that the curves fill it as the run goes).
    fn show(&self, ui: &mut egui::Ui, width: f32, last_step: usize, add: impl FnOnce(&mut egui_plot::PlotUi<'_>)) {
        ui.vertical(|ui| {
            ui.set_width(width);
            ui.horizontal_wrapped(|ui| {
                ui.strong(self.title);
                if !self.styles.is_empty() {
                    ui.weak(self.styles);
                }
            });
            let mut plot = Plot::new(self.id).include_x(0.0).include_x(last_step as f64);
            for &y in self.y_shows {
                plot = plot.include_y(y);
            }
            if self.scientific {
                plot = plot.y_axis_formatter(|mark, _| format!("{:.1e}", mark.value)).y_axis_min_width(40.0);
            }
            plot.legend(
                Legend::default()
                    .text_style(egui::TextStyle::Small)
                    .position(self.corner)
                    .follow_insertion_order(true)
                    .background_alpha(0.9),
            )
            .height(190.0)
            .width(width)
            .x_axis_label("step")
            .y_axis_label(self.y)
            .allow_scroll(false)
            .show(ui, add);
        });
    }
}

/// A legend entry: the quantity, after the run's name when runs are overlaid.
fn entry(runs: usize, run: &str, what: &str) -> String {
    if runs > 1 { format!("{run}: {what}") } else { what.to_owned() }
}

fn plots(ui: &mut egui::Ui, rt: &Runtime) {
    use egui_plot::Corner;
    let series = shown_series(rt);
    if series.iter().all(|(_, s)| s.train.is_empty()) {
        ui.label("Curves appear here as training runs; tick runs below to overlay them.");
        return;
    }
    let n = series.len();
    let width = (ui.available_width() / 2.0 - 12.0).max(200.0);
    // One colour per run and slot: a run's slots in the window's slot colours; with runs
    // overlaid, each run's slots a band of the palette of its own.
    let k_max = series.iter().filter_map(|(_, s)| s.train.last()).map(|m| m.losses.slot_acc.len()).max().unwrap_or(1);
    let slot_colour = |run: usize, j: usize| if n == 1 { theme::slot(j + 1) } else { theme::series(run * k_max + j) };
    let last_step =
        series.iter().map(|(_, s)| s.total_steps.max(s.train.last().map_or(0, |m| m.step))).max().unwrap_or(0);
    ui.horizontal_top(|ui| {
        let losses =
            Chart { styles: "solid: training batches · dashed: validation", ..Chart::new("losses", "Losses", "loss") };
        losses.show(ui, width, last_step, |pu| {
            for (i, (run, s)) in series.iter().enumerate() {
                let c = |j| theme::series(i * 4 + j);
                let total = entry(n, run, "total");
                pu.line(line(total.clone(), &s.train, |m| Some(m.losses.loss), c(0)));
                pu.line(line(total, &s.val, |m| Some(m.losses.loss), c(0)).style(egui_plot::LineStyle::dashed_loose()));
                pu.line(line(entry(n, run, "base"), &s.train, |m| Some(m.losses.loss_base), c(1)));
                pu.line(line(entry(n, run, "sampler"), &s.train, |m| Some(m.losses.loss_sampler), c(2)));
                // The weighted term, as it enters the total (the raw one sums over the width
                // and would flatten the others).
                pu.line(line(
                    entry(n, run, "LCM × weight"),
                    &s.train,
                    |m| Some(m.losses.loss - m.losses.loss_base - m.losses.loss_sampler),
                    c(3),
                ));
            }
        });
        let accuracy = Chart {
            styles: "solid: LM head · dotted: sampler · dashed: validation",
            corner: Corner::LeftTop,
            y_shows: &[0.0, 1.0],
            ..Chart::new("slot-acc", "Draft accuracy by mask slot", "accuracy")
        };
        accuracy.show(ui, width, last_step, |pu| {
            for (i, (run, s)) in series.iter().enumerate() {
                let k = s.train.last().map_or(0, |m| m.losses.slot_acc.len());
                for j in 0..k {
                    let (name, colour) = (entry(n, run, &format!("slot {}", j + 1)), slot_colour(i, j));
                    pu.line(line(name.clone(), &s.train, |m| m.losses.slot_acc.get(j).copied(), colour));
                    pu.line(
                        line(name.clone(), &s.train, |m| m.losses.slot_acc_sampler.get(j).copied(), colour)
                            .style(egui_plot::LineStyle::dotted_dense()),
                    );
                    pu.line(
                        line(name, &s.val, |m| m.losses.slot_acc.get(j).copied(), colour)
                            .style(egui_plot::LineStyle::dashed_loose()),
                    );
                }
            }
        });
    });
    ui.horizontal_top(|ui| {
        let acceptance = Chart {
            styles: "lines: expected from the slot accuracies · large dots: measured by decoding held-out prompts",
            corner: Corner::LeftTop,
            y_shows: &[1.0, 2.0],
            ..Chart::new("acceptance", "Tokens per forward", "tokens per forward")
        };
        acceptance.show(ui, width, last_step, |pu| {
            for (i, (run, s)) in series.iter().enumerate() {
                let k = s.val.iter().rev().find_map(|m| m.expected_tokens_per_forward.as_ref()).map_or(0, Vec::len);
                for j in 0..k {
                    let colour = slot_colour(i, j);
                    let masks = if j == 0 { "1 mask".to_string() } else { format!("{} masks", j + 1) };
                    let name = entry(n, run, &masks);
                    let at = |f: fn(&StepMetrics) -> Option<&Vec<f64>>| -> Vec<[f64; 2]> {
                        s.val.iter().filter_map(|m| f(m).and_then(|v| v.get(j)).map(|y| [m.step as f64, *y])).collect()
                    };
                    let expected = at(|m| m.expected_tokens_per_forward.as_ref());
                    pu.line(Line::new(name.clone(), PlotPoints::from(expected.clone())).color(colour));
                    // Small dots too: the first validation's value is a line of one point.
                    pu.points(
                        egui_plot::Points::new(name.clone(), PlotPoints::from(expected)).color(colour).radius(1.5),
                    );
                    let measured = at(|m| m.measured_tokens_per_forward.as_ref());
                    pu.points(egui_plot::Points::new(name, PlotPoints::from(measured)).color(colour).radius(3.5));
                }
            }
        });
        let lr = Chart { y_shows: &[0.0], scientific: true, ..Chart::new("lr", "Learning rate", "learning rate") };
        lr.show(ui, width, last_step, |pu| {
            for (i, (run, s)) in series.iter().enumerate() {
                pu.line(line(entry(n, run, "learning rate"), &s.train, |m| Some(m.lr), theme::series(i)));
            }
        });
    });
    let gpu = series.iter().any(|(_, s)| s.train.iter().any(|m| m.gpu_mem_bytes.is_some()));
    if rt.hide_timings && !gpu {
        return;
    }
    ui.horizontal_top(|ui| {
        if !rt.hide_timings {
            let speed = Chart {
                corner: Corner::RightBottom,
                y_shows: &[0.0],
                ..Chart::new("throughput", "Training speed", "tokens/s")
            };
            speed.show(ui, width, last_step, |pu| {
                for (i, (run, s)) in series.iter().enumerate() {
                    pu.line(line(entry(n, run, "tokens/s"), &s.train, |m| Some(m.tokens_per_second), theme::series(i)));
                }
            });
        }
        if gpu {
            let memory = Chart {
                styles: "in use on the card (nvidia-smi, every 10 steps)",
                corner: Corner::RightBottom,
                y_shows: &[0.0],
                ..Chart::new("gpu-memory", "GPU memory", "GiB")
            };
            memory.show(ui, width, last_step, |pu| {
                for (i, (run, s)) in series.iter().enumerate() {
                    pu.line(line(
                        entry(n, run, "GiB"),
                        &s.train,
                        |m| m.gpu_mem_bytes.map(|b| b as f64 / 1073741824.0),
                        theme::series(i),
                    ));
                }
            });
        }
    });
}

fn runs(ui: &mut egui::Ui, p: &Persisted, rt: &mut Runtime, commands: &mut Vec<Command>) {
    ui.horizontal(|ui| {
        ui.heading("Runs");
        if ui.small_button("Refresh").clicked() {
            commands.push(Command::RefreshRuns);
        }
    });
    if p.project_dir.is_none() {
        ui.weak("Open or create a project to keep runs in it.");
    }
    // The run training now: listed from its live records until the list is read again at
    // its end (the worker, busy training, reads no folders meanwhile).
    let live = rt.live.clone().filter(|l| rt.job == Some(Job::Train) && !rt.runs.iter().any(|r| r.dir == l.dir));
    if rt.runs.is_empty() && live.is_none() {
        ui.weak("no runs yet");
        return;
    }
    let busy = rt.busy();
    egui::Grid::new("runs").num_columns(6).striped(true).show(ui, |ui| {
        ui.strong("overlay");
        ui.strong("run");
        ui.strong("steps");
        ui.strong("last loss");
        ui.strong("tokens/forward at k").on_hover_text(
            "The last validation's tokens per forward at k masks: expected from the drafter's slot accuracies, \
             and measured by decoding held-out prompts",
        );
        ui.strong("");
        ui.end_row();
        if let Some(l) = &live {
            ui.label("");
            ui.label(l.dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
            ui.label(format!("{}/{}", l.train.last().map_or(0, |m| m.step), l.total_steps));
            ui.label(l.train.last().map_or("-".into(), |m| format!("{:.3}", m.losses.loss)));
            ui.label(final_acceptance(&l.val));
            ui.weak(if rt.paused { "paused" } else { "training" });
            ui.end_row();
        }
        let runs = rt.runs.clone();
        for r in &runs {
            let mut on = rt.overlay.contains(&r.dir);
            if ui.checkbox(&mut on, "").on_hover_text("Overlay this run's curves").changed() {
                if on {
                    rt.overlay.push(r.dir.clone());
                } else {
                    rt.overlay.retain(|d| d != &r.dir);
                }
            }
            ui.label(r.dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
            let last = r.metrics.iter().rfind(|m| m.split == mtp_core::train::Split::Train);
            let total = r.config.as_ref().map_or(0, |c| c.training.steps);
            let done = last.map_or(0, |m| m.step);
            ui.label(format!("{done}/{total}"));
            ui.label(last.map_or("-".into(), |m| format!("{:.3}", m.losses.loss)));
            ui.label(final_acceptance(&r.metrics));
            ui.horizontal(|ui| {
                let waits = "Waits for the running job";
                let adapter = mtp_core::train::RunDir(r.dir.clone()).adapter();
                if rt.adapter.as_ref().is_some_and(|a| a.path == adapter) {
                    ui.weak("in use").on_hover_text("Compare, Step, Bench and Probe decode with this run's adapter");
                } else if ui
                    .add_enabled(!busy, egui::Button::new("Use"))
                    .on_hover_text("Load this run's adapter for Compare, Step, Bench and Probe")
                    .on_disabled_hover_text(waits)
                    .clicked()
                {
                    commands.push(Command::UseRun(r.dir.clone()));
                }
                let steps = p.train.recipe.training.steps;
                if total > 0 && done >= total {
                    // Finished: training it further is a choice, made with the Steps field.
                    let can = steps > total;
                    let label = if can { format!("Extend to {steps}") } else { "Extend".to_string() };
                    if ui
                        .add_enabled(!busy && can, egui::Button::new(label))
                        .on_hover_text(format!(
                            "Train this finished run on from step {total} to {steps} (the Steps above); its adapter is \
                             replaced as it goes"
                        ))
                        .on_disabled_hover_text(if busy {
                            waits.to_string()
                        } else {
                            format!("Finished at step {total}: set Steps above {total} to train it further")
                        })
                        .clicked()
                    {
                        commands.push(Command::Resume { dir: r.dir.clone(), extend_to: Some(steps) });
                    }
                } else if ui
                    .add_enabled(!busy, egui::Button::new("Resume"))
                    .on_hover_text(format!("Continue from its last checkpoint to step {total}"))
                    .on_disabled_hover_text(waits)
                    .clicked()
                {
                    commands.push(Command::Resume { dir: r.dir.clone(), extend_to: None });
                }
                let servable = r.config.as_ref().is_some_and(|c| c.method.recipe == Recipe::Uno);
                if ui
                    .add_enabled(!busy && servable, egui::Button::new("Export PEFT"))
                    .on_hover_text(
                        "Write the adapter as a PEFT LoRA folder (peft/ in the run) that SGLang's and vLLM's UNO \
                         speculative decoding load; for runs of the UNO recipe",
                    )
                    .on_disabled_hover_text(if busy {
                        "Waits for the running job"
                    } else {
                        "Only runs of the UNO recipe can be served by UNO decoding (this run's mask rows read \
                         learned mask embeddings through a sampler head): train one with Recipe: uno"
                    })
                    .clicked()
                {
                    commands.push(Command::ExportPeft(r.dir.clone()));
                }
            });
            ui.end_row();
        }
    });
}

/// A run's last acceptance at k masks: expected, and measured when it was.
fn final_acceptance(metrics: &[StepMetrics]) -> String {
    let last_k =
        |f: fn(&StepMetrics) -> Option<&Vec<f64>>| metrics.iter().rev().find_map(f).and_then(|v| v.last().copied());
    match (last_k(|m| m.expected_tokens_per_forward.as_ref()), last_k(|m| m.measured_tokens_per_forward.as_ref())) {
        (Some(e), Some(m)) => format!("{e:.2} expected, {m:.2} measured"),
        (Some(e), None) => format!("{e:.2} expected"),
        (None, Some(m)) => format!("{m:.2} measured"),
        (None, None) => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use mtp_core::train::StepMetrics;

    /// A resumed run's ETA comes from this session's steps, not from the clock of the
    /// sessions before it.
    #[test]
    fn the_time_a_step_takes_comes_from_this_session() {
        let at = |step: usize, elapsed: f64| StepMetrics { step, elapsed, ..StepMetrics::default() };
        let earlier: Vec<StepMetrics> = (1..=30).map(|s| at(s, 10.0 * s as f64)).collect();
        assert_eq!(super::seconds_a_step(&earlier), Some(10.0));
        let mut resumed = earlier;
        resumed.extend([at(31, 2.0), at(32, 4.0), at(33, 6.0)]);
        assert_eq!(super::seconds_a_step(&resumed), Some(2.0));
        assert_eq!(super::seconds_a_step(&resumed[..31]), None, "one step of this session");
        assert_eq!(super::seconds_a_step(&[]), None);
    }
}
