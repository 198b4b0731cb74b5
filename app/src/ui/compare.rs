//! The Compare view (A/B race): one prompt, AR in lane A, linear or quadratic MTP in lane
//! B, generating at the same time from the same weights. Every MTP token is coloured by how
//! it was produced (verified, or accepted draft slot j); rejected drafts are struck through
//! where they were rejected; hovering a token shows its step. Greedy races get an "outputs
//! identical" badge.

use mtp_core::decode::{Mode, TokenOrigin};

use super::theme;
use crate::app::{Command, Pick};
use crate::state::{LaneState, Persisted, RaceState, Runtime};
use crate::worker::Job;

/// Draw the Compare view.
pub fn show(ui: &mut egui::Ui, p: &mut Persisted, rt: &Runtime, commands: &mut Vec<Command>) {
    ui.heading("A/B race: AR vs multi-token");
    let k = rt.adapter.as_ref().map_or(0, |a| a.config.k);
    let c = &mut p.compare;
    super::named(
        ui.add(
            egui::TextEdit::multiline(&mut c.prompt).desired_rows(3).desired_width(f32::INFINITY).hint_text("prompt"),
        ),
        egui::Role::MultilineTextInput,
        "Prompt",
    );
    ui.horizontal(|ui| {
        let label = ui.label("Lane B").on_hover_text("Lane A always decodes AR, one token per forward pass");
        let mode = egui::ComboBox::from_id_salt("lane-b-mode").selected_text(c.mode.name()).show_ui(ui, |ui| {
            ui.selectable_value(&mut c.mode, Mode::Quadratic, "quadratic")
                .on_hover_text("The method: a mask block after every token");
            ui.selectable_value(&mut c.mode, Mode::Linear, "linear")
                .on_hover_text("The ablation: drafts, then one mask block");
        });
        mode.response.labelled_by(label.id);
        let label = ui.label("masks");
        ui.add_enabled(!c.auto_masks, egui::DragValue::new(&mut c.masks).range(1..=k.max(1)))
            .labelled_by(label.id)
            .on_hover_text("Mask tokens per step (1..k of the adapter)");
        ui.checkbox(&mut c.auto_masks, "auto")
            .on_hover_text("Choose each step's masks from the recent acceptance (up to k)");
        ui.separator();
        ui.checkbox(&mut c.greedy, "Greedy")
            .on_hover_text("Greedy: outputs must be identical. Off: sampled with the same seed");
        let drag = egui::Role::SpinButton;
        let temperature = egui::DragValue::new(&mut c.temperature).range(0.05..=2.0).speed(0.01).prefix("T ");
        super::named(ui.add_enabled(!c.greedy, temperature), drag, "Temperature");
        super::named(ui.add_enabled(!c.greedy, egui::DragValue::new(&mut c.seed).prefix("seed ")), drag, "Seed");
        let most = super::max_new_tokens(rt, 4096);
        let max = egui::DragValue::new(&mut c.max_new_tokens).range(1..=most).prefix("max ");
        super::named(ui.add(max), drag, "Most new tokens");
        ui.add_enabled(
            rt.model.as_ref().is_some_and(|m| m.chat_template),
            egui::Checkbox::new(&mut c.chat, "Chat template"),
        );
    });
    ui.horizontal(|ui| {
        let why = super::not_ready(rt, true);
        let race = ui.add_enabled(why.is_none(), egui::Button::new("Race"));
        if race.on_disabled_hover_text(why.unwrap_or_default()).clicked() {
            commands.push(Command::StartRace);
        }
        if rt.job == Some(Job::Race) && ui.button("Stop").clicked() {
            commands.push(Command::Cancel);
        }
        let has_race = rt.race.lanes.iter().any(|l| !l.tokens.is_empty());
        if ui
            .add_enabled(has_race, egui::Button::new("Export JSON…"))
            .on_hover_text("Both lanes' text and statistics")
            .clicked()
        {
            commands.push(Command::Pick(Pick::SaveRaceJson));
        }
        if ui
            .add_enabled(has_race, egui::Button::new("Export PNG"))
            .on_hover_text("A picture of this view (not the sidebar or the status bar), saved in the project folder")
            .clicked()
        {
            commands.push(Command::ScreenshotRace);
        }
        super::adapter_line(ui, rt);
    });
    ui.separator();
    badges(ui, rt);
    legend(ui, k);
    ui.columns(2, |cols| {
        lane(&mut cols[0], rt, "Lane A: AR", &rt.race.lanes[0]);
        let b = match (&rt.race.lane_b, &rt.race.adapter) {
            (mode, _) if mode.is_empty() => "Lane B".to_string(),
            (mode, Some(adapter)) => format!("Lane B: {mode}, adapter {}", super::adapter_name(adapter)),
            (mode, None) => format!("Lane B: {mode}"),
        };
        lane(&mut cols[1], rt, &b, &rt.race.lanes[1]);
    });
}

fn badges(ui: &mut egui::Ui, rt: &Runtime) {
    let race = &rt.race;
    ui.horizontal(|ui| {
        match race.identical() {
            Some(true) if race.stopped() => {
                ui.label(egui::RichText::new("identical so far (stopped)").color(theme::GOOD).strong())
                    .on_hover_text("Stopped before the end: the tokens both lanes wrote are the same");
            }
            Some(true) => {
                ui.label(egui::RichText::new("outputs identical").color(theme::GOOD).strong())
                    .on_hover_text("Greedy MTP decoding reproduced AR token for token");
            }
            Some(false) => {
                ui.label(egui::RichText::new("outputs differ").color(theme::BAD).strong())
                    .on_hover_text("A divergence: at a near-tie this is rounding; otherwise a bug worth reporting");
            }
            None => {}
        }
        if let Some(s) = race.speedup() {
            ui.label(egui::RichText::new(format!("speedup {}", super::timing(rt, format!("{s:.2}×")))).strong())
                .on_hover_text("Lane B's tokens per second over lane A's, each counting only its own compute time");
        }
    });
}

fn legend(ui: &mut egui::Ui, k: usize) {
    ui.horizontal_wrapped(|ui| {
        ui.label(egui::RichText::new("verified").color(theme::VERIFIED));
        for j in 1..=k {
            ui.label(egui::RichText::new(format!("draft {j}")).color(theme::slot(j)));
        }
        ui.label(egui::RichText::new("rejected").color(theme::REJECTED).strikethrough());
    });
}

fn lane(ui: &mut egui::Ui, rt: &Runtime, title: &str, l: &LaneState) {
    ui.strong(title);
    ui.label(format!(
        "{} tokens · {:.2} tokens/forward · {} tokens/s{}",
        l.tokens.len(),
        l.tokens_per_forward(),
        super::timing(rt, format!("{:.1}", l.tokens_per_second())),
        l.done.as_ref().map_or(String::new(), |d| format!(
            " · {}{}",
            d.stop,
            if d.cuda_graph { " · CUDA graphs" } else { "" }
        ))
    ));
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_min_height(160.0);
        ui.set_min_width(ui.available_width());
        ui.horizontal_wrapped(|ui| {
            ui.spacing_mut().item_spacing.x = 0.0;
            let mut rejected = l.rejected.iter().peekable();
            for (i, t) in l.tokens.iter().enumerate() {
                let colour = match t.origin {
                    TokenOrigin::Verified => theme::VERIFIED,
                    TokenOrigin::Draft { slot } => theme::slot(slot),
                };
                let how = match t.origin {
                    TokenOrigin::Verified => "verified by the model".to_string(),
                    TokenOrigin::Draft { slot } => format!("draft from mask slot {slot}, accepted"),
                };
                super::token_run(ui, &t.text, |r| r.monospace().color(colour), &format!("step {}: {how}", t.step));
                while let Some((at, text, step)) = rejected.peek() {
                    if *at != i {
                        break;
                    }
                    ui.label(
                        egui::RichText::new(super::token_text(text)).monospace().color(theme::REJECTED).strikethrough(),
                    )
                    .on_hover_text(format!("step {step}: draft rejected here"));
                    rejected.next();
                }
            }
        });
    });
    // Below the text, so that both lanes' text starts at the same height.
    acceptance(ui, l);
}

/// A speculative lane's acceptance: per draft slot, the share of the steps reaching it that
/// accepted its draft (a bar in the slot's colour), and the steps by tokens emitted.
fn acceptance(ui: &mut egui::Ui, l: &LaneState) {
    let a = mtp_core::decode::Acceptance::of(&l.steps);
    if a.reached.is_empty() {
        return;
    }
    ui.horizontal_wrapped(|ui| {
        ui.weak("drafts accepted").on_hover_text(
            "Per mask slot: of the steps whose drafts before it were all accepted, the share that accepted its \
             draft too",
        );
        for j in 1..=a.reached.len() {
            if let Some(rate) = a.rate(j) {
                let bar = egui::ProgressBar::new(rate as f32)
                    .desired_width(88.0)
                    .fill(theme::slot(j).gamma_multiply(0.55))
                    .text(format!("draft {j}: {:.0}%", rate * 100.0));
                ui.add(bar).on_hover_text(format!(
                    "{} of the {} steps that reached it",
                    a.accepted[j - 1],
                    a.reached[j - 1]
                ));
            }
        }
    });
    let by_count: Vec<String> = (1..a.emitted.len())
        .filter(|&n| a.emitted[n] > 0)
        .map(|n| format!("{}: {}", crate::counted(n, "token", "tokens"), a.emitted[n]))
        .collect();
    ui.weak(format!("steps that emitted {}", by_count.join(" · ")))
        .on_hover_text("How many steps emitted each number of tokens (accepted drafts + the verified next token)");
}

/// The race as JSON: both lanes' text, tokens, origins, steps and totals.
pub fn export_json(race: &RaceState) -> String {
    let lane = |l: &LaneState| {
        serde_json::json!({
            "text": l.tokens.iter().map(|t| t.text.as_str()).collect::<String>(),
            "tokens": l.tokens.iter().map(|t| serde_json::json!({"id": t.id, "text": t.text, "origin": t.origin, "step": t.step})).collect::<Vec<_>>(),
            "steps": l.steps,
            "tokens_per_forward": l.tokens_per_forward(),
            "tokens_per_second": l.tokens_per_second(),
            "forwards": l.done.as_ref().map(|d| d.forwards),
            "seconds": l.done.as_ref().map(|d| d.seconds),
        })
    };
    let v = serde_json::json!({
        "prompt": race.prompt,
        "greedy": race.greedy,
        "lane_a": lane(&race.lanes[0]),
        "lane_b": lane(&race.lanes[1]),
        "lane_b_mode": race.lane_b,
        "adapter": race.adapter,
        "identical": race.identical(),
        "speedup": race.speedup(),
        "acceptance": mtp_core::decode::Acceptance::of(&race.lanes[1].steps),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}
