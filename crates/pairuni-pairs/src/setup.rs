//! Builds the configured teacher and encoder.

use crate::builder::BuildPaths;
use crate::config::{EncoderConfig, EncoderKind, PairsConfig, TeacherKind};
use crate::encoder::resnet::resnet50;
use crate::encoder::toy::ToyDescriptor;
use crate::encoder::ImageEncoder;
use crate::error::{PairsError, Result};
use crate::teacher::cache::TeacherCache;
use crate::teacher::http::HttpTeacher;
use crate::teacher::oracle::OracleTeacher;
use crate::teacher::templates::Templates;
use crate::teacher::Teacher;

/// The teacher `cfg.teacher` asks for; the HTTP teacher's cache path is resolved beside the output file.
pub fn teacher_from_config(cfg: &PairsConfig, paths: &BuildPaths) -> Result<Box<dyn Teacher>> {
    let t = &cfg.teacher;
    if t.concurrency == 0 {
        return Err(PairsError::Config("teacher.concurrency must be ≥ 1".into()));
    }
    Ok(match t.kind {
        TeacherKind::Oracle => Box::new(OracleTeacher::new(t.error_rate, cfg.seed)),
        TeacherKind::Openai => {
            let templates = match &t.templates_dir {
                Some(dir) => Templates::load(dir)?,
                None => Templates::builtin(),
            };
            let cache = TeacherCache::open(&paths.beside_out(&t.cache))?;
            Box::new(HttpTeacher::new(t, templates, cache)?)
        }
    })
}

/// The encoder `cfg` asks for.
pub fn encoder_from_config(cfg: &EncoderConfig) -> Result<Box<dyn ImageEncoder>> {
    Ok(match cfg.kind {
        EncoderKind::Toy => Box::new(ToyDescriptor),
        EncoderKind::Resnet50 => {
            let w = cfg.weights.as_ref().ok_or_else(|| {
                PairsError::Config("encoder.weights is required for kind = \"resnet50\"".into())
            })?;
            Box::new(resnet50(w)?)
        }
    })
}
